"""atheris target: tlsproxy.config.parse on arbitrary TOML documents.

Invariant: whatever the document, parse either returns a Config or raises
ConfigError (the message the operator sees); any other exception is a crash.
"""

from pathlib import Path

from target import main


def load():
    import tomllib

    from tlsproxy import config

    def one_input(data: bytes) -> None:
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            return
        try:
            result = config.parse(raw, base_dir=Path("/nonexistent/conf"))
        except config.ConfigError as exc:
            assert str(exc), "ConfigError without a message"
            return
        assert isinstance(result, config.Config), f"parse returned {result!r}"

    return one_input


if __name__ == "__main__":
    main(load)
