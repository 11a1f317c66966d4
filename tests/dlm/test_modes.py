from cohort.dlm.modes import COMPATIBLE, Mode, compatible, parse_mode

# the seed's table, row = existing, column = requested, as printed in 003
SEED = """
NL Yes Yes Yes Yes Yes Yes
CR Yes Yes Yes Yes Yes No
CW Yes Yes Yes No No No
PR Yes Yes No Yes No No
PW Yes Yes No No No No
EX Yes No No No No No
"""


def test_matrix_is_the_seed_table() -> None:
    for line in SEED.strip().splitlines():
        name, *cells = line.split()
        for req, cell in zip(Mode, cells, strict=True):
            assert compatible(Mode[name], req) is (cell == "Yes"), (name, req)
            assert COMPATIBLE[Mode[name]][req] is (cell == "Yes")


def test_symmetric() -> None:
    for a in Mode:
        for b in Mode:
            assert compatible(a, b) == compatible(b, a)


def test_parse() -> None:
    assert parse_mode("pr") is Mode.PR
    assert parse_mode(5) is Mode.EX
