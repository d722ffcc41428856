"""The full FedP²EFT protocol (base model -> PS generator -> personalize every client -> report)."""
