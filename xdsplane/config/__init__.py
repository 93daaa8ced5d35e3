"""Reading a folder of YAML files into snapshots, with errors that name file and line."""
