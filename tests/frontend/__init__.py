"""Frontend tests: parser, printer, checker, errors, CLI."""
