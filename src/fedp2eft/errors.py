"""One exception type for every mistake a user can fix; the CLI prints its message without a traceback."""


class FedP2EFTError(ValueError):
    """Bad input or configuration. The message says what was wrong and how to fix it."""


def config_from_mapping(cls, raw: dict, where: str):
    """Build the dataclass ``cls`` from a mapping, naming unknown keys instead of failing with a TypeError."""
    from dataclasses import fields

    known = {field.name for field in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FedP2EFTError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(sorted(known))}")
    return cls(**raw)
