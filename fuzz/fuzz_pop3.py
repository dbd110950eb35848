"""atheris target: the pop3 engine driven by a script of chunks (fuzz/script.py);
any invariant of fuzz/harness.py that breaks raises and is kept as a crash."""

from target import main


def load():
    from fuzz.script import run

    def one_input(data: bytes) -> None:
        run("pop3", data)

    return one_input


if __name__ == "__main__":
    main(load)
