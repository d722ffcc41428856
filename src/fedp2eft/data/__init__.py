"""Federated datasets: the embedded benchmark, paper benchmarks and user files behind one registry."""
