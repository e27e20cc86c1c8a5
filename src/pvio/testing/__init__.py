"""pvio.testing: conformance suites and helpers shipped for pvio's own tests and users'."""
