"""Model names -> local Hugging Face checkpoint directories (hub, local path, or embedded)."""
