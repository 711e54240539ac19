"""Files: input checks and loading, tensor streaming, the staged writer, publishing."""
