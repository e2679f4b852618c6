"""One module per pass; `pipeline` names them and runs them (docs/design.md)."""
