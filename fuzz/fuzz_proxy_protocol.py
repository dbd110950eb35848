"""atheris target: tlsproxy.proxy_protocol.parse on arbitrary connection starts.

Invariants (the module's own promises): only NEED_MORE, Parsed or
ProxyProtocolError come out; NEED_MORE only while the buffer is within the
header bounds; reading the same bytes in pieces gives the same answer (an
error on a prefix stays an error, a header parsed from a prefix stays that
header with the later bytes in ``rest``); a parsed header encodes and parses
back to itself.
"""

from target import main


def load():
    from tlsproxy import proxy_protocol as pp

    bound = max(pp.V1_MAX_LENGTH, pp.V2_FIXED_LENGTH + pp.V2_MAX_PAYLOAD)

    def outcome(data: bytes):
        try:
            result = pp.parse(data)
        except pp.ProxyProtocolError as exc:
            assert exc.reason, "error without a reason"
            return exc
        assert result is pp.NEED_MORE or isinstance(result, pp.Parsed), f"parse returned {result!r}"
        if result is pp.NEED_MORE:
            assert len(data) < bound, f"NEED_MORE after {len(data)} bytes"
        return result

    def one_input(data: bytes) -> None:
        full = outcome(data)
        for n in sorted({*range(min(len(data), 64)), *range(64, len(data), 37)}):
            part = outcome(data[:n])
            if isinstance(part, pp.ProxyProtocolError):
                assert isinstance(full, pp.ProxyProtocolError), f"prefix {n} refused, whole accepted"
            elif isinstance(part, pp.Parsed):
                assert full == pp.Parsed(part.header, part.rest + data[n:]), f"prefix {n} parsed differently"
        if isinstance(full, pp.Parsed):
            h = full.header
            again = pp.parse(pp.encode("v1" if h.version == 1 else "v2", h.source, h.destination))
            assert isinstance(again, pp.Parsed) and again.header == h, f"{h!r} does not round-trip"

    return one_input


if __name__ == "__main__":
    main(load)
