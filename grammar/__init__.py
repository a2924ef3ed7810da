"""The Lark grammar of the .cnn language, installed as package data of cnnc."""
