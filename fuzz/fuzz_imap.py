"""atheris target: the imap engine driven by a script of chunks (fuzz/script.py);
any invariant of fuzz/harness.py that breaks raises and is kept as a crash."""

from target import main


def load():
    from fuzz.script import run

    def one_input(data: bytes) -> None:
        run("imap", data)

    return one_input


if __name__ == "__main__":
    main(load)
