"""Dataset I/O: the output folder and its locks, safe paths, reading dataset folders, pixels."""
