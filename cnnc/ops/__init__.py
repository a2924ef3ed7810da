"""The ops cnnc knows: `registry.py` holds the table; each other module of this folder is an
op family that registers its `OpDef`s there (`conv`, `pool`, ...), or a helper the families
share (`window`, `lowering`). The registry imports every module of the folder on first use,
so a new op file is found without being listed anywhere. Stages import `cnnc.ops.registry`,
never one op's file."""
