"""`cnnc compile --emit lib`: a network's inference pass as a C library (a header, a static
and a shared library, a weights file), for this CPU or another (`--triple`, `--cpu`)."""
