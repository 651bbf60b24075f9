//! Pipeline files: YAML model, validation, `${VAR}` substitution, runner and outputs.
