"""Test densities and helpers used by the tests, benchmarks and notebooks."""
