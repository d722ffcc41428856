"""Flower adapters: thin ServerApp/ClientApp layers that move tensors for an engine-free FederatedTask."""
