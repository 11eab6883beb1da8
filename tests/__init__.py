"""fwbuild's tests: unit tests by package, end-to-end ones in e2e/."""
