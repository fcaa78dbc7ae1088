"""Version ordering: fixed cases from Debian policy §5.6.12, and thousands of generated pairs checked against dpkg."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from abflasher.errors import InvalidArgument
from abflasher.version import Version, _equality_key, compare_versions, parse_version

DPKG = shutil.which("dpkg")
needs_dpkg = pytest.mark.skipif(DPKG is None, reason="dpkg is not installed")

# One dpkg process per comparison is ~2 ms; one shell per batch keeps thousands of pairs within seconds.
_COMPARE_SCRIPT = r"""
while read -r a b; do
    if dpkg --compare-versions "$a" lt "$b"; then echo -1
    elif dpkg --compare-versions "$a" eq "$b"; then echo 0
    else echo 1
    fi
done
"""

_CLEAN_SCRIPT = r"""
while IFS= read -r v; do
    if err=$(dpkg --compare-versions "$v" eq "$v" 2>&1) && [ -z "$err" ]; then echo clean; else echo dirty; fi
done
"""


def dpkg_compare_batch(pairs: list[tuple[str, str]]) -> list[int]:
    """dpkg's verdict (-1/0/1) for each pair; fails the test if dpkg warned about any of them."""
    stdin = "".join(f"{a} {b}\n" for a, b in pairs)
    result = subprocess.run(
        ["sh", "-c", _COMPARE_SCRIPT], input=stdin, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stderr == "", f"dpkg complained about a version we accept:\n{result.stderr}"
    verdicts = [int(line) for line in result.stdout.split()]
    assert len(verdicts) == len(pairs)
    return verdicts


def dpkg_accepts_batch(texts: list[str]) -> list[bool]:
    """For each string: does dpkg parse it without an error or a warning?"""
    stdin = "".join(f"{text}\n" for text in texts)
    result = subprocess.run(
        ["sh", "-c", _CLEAN_SCRIPT], input=stdin, capture_output=True, text=True, timeout=120, check=True
    )
    verdicts = result.stdout.split()
    assert len(verdicts) == len(texts)
    return [verdict == "clean" for verdict in verdicts]


# --- fixed cases ---------------------------------------------------------------------------------------------------

# Each tuple is strictly increasing.
ASCENDING_CHAINS = [
    # Policy §5.6.12: "~~" < "~~a" < "~" < "" < "a".
    ("1.0~~", "1.0~~a", "1.0~", "1.0", "1.0a"),
    ("2024.11.1~rc1", "2024.11.1~rc2", "2024.11.1", "2024.11.1+b1", "2024.11.2"),
    ("1.4.0", "1.4.1", "1.10.0", "2.0", "1:0.1", "1:2.0", "2:0"),
    ("1.0-1", "1.0-1.1", "1.0-2", "1.0-10", "1.0a-1", "1.0.1-0"),
    ("1.0", "1.0.0", "1.0.0.1"),
    ("1.0", "1.0a", "1.0+", "1.0."),  # letters before non-letters; among those ASCII order ('+' < '.')
    ("1A", "1Z", "1a", "1z"),  # letters by ASCII: upper case first
    ("1~", "1", "1+"),
    ("0~", "0", "0.0"),  # "0.0" is "0" then ".0": the extra "." makes it larger
    ("1-1~", "1-1", "1-1a"),
]

EQUAL_PAIRS = [
    ("1.0", "1.00"),
    ("1.01", "1.1"),
    ("0:1.0", "1.0"),
    ("00:1.0", "1.0"),
    ("1.0", "1.0-0"),
    ("1.0-00", "1.0"),
    ("1.0.", "1.0.0"),  # an absent digit run counts as 0
    ("007", "7"),
    ("1.4.0\n", " 1.4.0 "),
]


@pytest.mark.parametrize("chain", ASCENDING_CHAINS, ids=" < ".join)
def test_ascending_chains(chain: tuple[str, ...]) -> None:
    for lower_index, lower in enumerate(chain):
        for higher in chain[lower_index + 1 :]:
            assert compare_versions(lower, higher) == -1, (lower, higher)
            assert compare_versions(higher, lower) == 1, (higher, lower)
            assert parse_version(lower) < parse_version(higher)
            assert parse_version(higher) > parse_version(lower)


@pytest.mark.parametrize(("a", "b"), EQUAL_PAIRS)
def test_equal_versions(a: str, b: str) -> None:
    assert compare_versions(a, b) == 0
    assert parse_version(a) == parse_version(b)
    assert hash(parse_version(a)) == hash(parse_version(b))
    assert len({parse_version(a), parse_version(b)}) == 1


@needs_dpkg
def test_fixed_cases_agree_with_dpkg() -> None:
    pairs = [(a.strip(), b.strip()) for a, b in EQUAL_PAIRS]
    for chain in ASCENDING_CHAINS:
        pairs += [(chain[i], chain[j]) for i in range(len(chain)) for j in range(len(chain))]
    assert [compare_versions(a, b) for a, b in pairs] == dpkg_compare_batch(pairs)


@pytest.mark.parametrize(
    ("text", "epoch", "upstream", "revision"),
    [
        ("1.4.0", 0, "1.4.0", ""),
        ("1.4.0\n", 0, "1.4.0", ""),
        ("1:2.0", 1, "2.0", ""),
        ("2024.11.1~rc1", 0, "2024.11.1~rc1", ""),
        ("1.0-2-3", 0, "1.0-2", "3"),  # the revision starts after the LAST hyphen
        ("2:1:2.0-1", 2, "1:2.0", "1"),  # the epoch ends at the FIRST colon
        ("0:1.0", 0, "1.0", ""),
        ("1.0-a", 0, "1.0", "a"),
    ],
)
def test_parse_splits_epoch_upstream_revision(text: str, epoch: int, upstream: str, revision: str) -> None:
    assert parse_version(text) == Version(epoch, upstream, revision)
    parsed = parse_version(text)
    assert (parsed.epoch, parsed.upstream, parsed.revision) == (epoch, upstream, revision)


@pytest.mark.parametrize(
    ("text", "shown"),
    [("1.4.0\n", "1.4.0"), ("0:1.0", "1.0"), ("1:2.0-3", "1:2.0-3"), ("0:1:2", "0:1:2"), ("1.0-2-3", "1.0-2-3")],
)
def test_str(text: str, shown: str) -> None:
    assert str(parse_version(text)) == shown


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        ("", "empty"),
        ("  \n", "empty"),
        ("1.0 2", "whitespace"),
        (":1.0", "empty epoch"),
        ("a:1.0", "not a non-negative number"),
        ("-1:1.0", "not a non-negative number"),
        ("+1:1.0", "not a non-negative number"),  # dpkg's strtol() would take it
        ("-0:1.0", "not a non-negative number"),  # and this
        ("99999999999:1.0", "epoch larger"),
        ("1:", "nothing after"),
        ("1.0-", "revision after it is empty"),
        ("-1", "empty upstream"),
        ("1:-1", "empty upstream"),
        ("v1.4.0", "must start with a digit"),
        ("1:v1.4.0", "must start with a digit"),
        ("~1", "must start with a digit"),
        ("1.0_rc1", "'_'"),
        ("1.0/2", "'/'"),
        ("1.0$", "'$'"),
        ("1.4.0é", "'é'"),
        ("1.٣", "'٣'"),  # a non-ASCII digit
        ("1:1.0-1:2", "revision"),
        ("1.0-1:2", "epoch"),  # the epoch ends at the FIRST colon
        ("1.0-1-", "revision after it is empty"),
    ],
)
def test_invalid_versions_are_refused(text: str, message_part: str) -> None:
    with pytest.raises(InvalidArgument, match="version") as caught:
        parse_version(text)
    assert message_part in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(InvalidArgument):
        compare_versions("1.0", text)
    with pytest.raises(InvalidArgument):
        compare_versions(text, "1.0")


def test_a_version_too_long_is_refused_without_being_echoed() -> None:
    huge = "1" * (1 << 20)
    for text in (huge, huge + ".0", "1." + "9" * 300, "1:" + "0" * 4400 + "1"):
        with pytest.raises(InvalidArgument, match="at most 256") as caught:
            parse_version(text)
        assert len(str(caught.value)) < 200
        with pytest.raises(InvalidArgument):
            compare_versions(text, "1.0.0")
    assert compare_versions("1." + "9" * 254, "1." + "9" * 253) == 1


def test_digit_runs_longer_than_python_converts_compare_as_numbers() -> None:
    # 4301 digits: int() of it raises ValueError (Python's conversion limit); versions built directly skip the bound.
    many = "1" * 4301
    assert Version(0, many).compare(Version(0, "1.0.0")) == 1
    assert Version(0, "1.0.0").compare(Version(0, many)) == -1
    assert Version(0, many).compare(Version(0, "000" + many)) == 0
    assert Version(0, many + "0").compare(Version(0, many + "1")) == -1
    assert Version(0, many) == Version(0, "0" + many)
    assert hash(Version(0, many)) == hash(Version(0, "0" + many))
    assert Version(0, "1.0" + "0" * 5000) == Version(0, "1." + "0" * 5000)


def test_comparing_with_other_types_is_not_supported() -> None:
    version = parse_version("1.0")
    assert version != "1.0"
    with pytest.raises(TypeError):
        _ = version < "2.0"


# --- generated cases -----------------------------------------------------------------------------------------------

# Small alphabets on purpose: near-equal pairs (leading zeros, one extra '~' or letter) are where orderings disagree.
# sampled_from rather than from_regex: generation, not dpkg, dominated this test's time.
digit_runs = st.sampled_from(["0", "1", "2", "9", "10", "11", "99", "100", "00", "01", "002", "010", "0100"])
upstream_separators = st.sampled_from([".", "+", "~", "~~", "a", "b", "Z", "rc", "~rc", "+b", ".a", "a."])
revision_separators = st.sampled_from([".", "+", "~", "a", "b", "Z", "+b", "~bpo"])


@st.composite
def version_parts(draw: st.DrawFn, separators: st.SearchStrategy[str], start_with_digits: bool) -> str:
    parts = [draw(digit_runs)] if start_with_digits else []
    for _ in range(draw(st.integers(min_value=0 if start_with_digits else 1, max_value=4))):
        parts.append(draw(separators))
        if draw(st.booleans()):
            parts.append(draw(digit_runs))
    return "".join(parts)


@st.composite
def version_texts(draw: st.DrawFn) -> str:
    epoch = draw(st.sampled_from([None, None, None, "0", "1", "2", "01"]))
    revision = draw(st.none() | version_parts(revision_separators, start_with_digits=draw(st.booleans())))
    extra = []  # '-' in upstream only when a revision follows, ':' only after an epoch
    if revision is not None:
        extra.append("-")
    if epoch is not None:
        extra.append(":")
    separators = upstream_separators | st.sampled_from(extra) if extra else upstream_separators
    upstream = draw(version_parts(separators, start_with_digits=True))
    text = upstream
    if epoch is not None:
        text = f"{epoch}:{text}"
    if revision is not None:
        text = f"{text}-{revision}"
    return text


@st.composite
def nearby_version_texts(draw: st.DrawFn, original: str) -> str:
    """original with one small edit (insert, delete or replace a character); original itself if that is invalid."""
    position = draw(st.integers(min_value=0, max_value=len(original)))
    edit = draw(st.sampled_from(["insert", "delete", "replace"]))
    char = draw(st.sampled_from("0019a~.+-Z"))
    if edit == "insert":
        edited = original[:position] + char + original[position:]
    elif edit == "delete":
        edited = original[:position] + original[position + 1 :]
    else:
        edited = original[:position] + char + original[position + 1 :]
    try:
        parse_version(edited)
    except InvalidArgument:
        return original
    return edited


version_pairs = st.one_of(
    st.tuples(version_texts(), version_texts()),
    version_texts().flatmap(lambda text: st.tuples(st.just(text), nearby_version_texts(text))),
)

# No shrinking: each step would rerun dpkg on a whole batch, and the failure message already names the pairs.
GENERATED = settings(
    max_examples=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@needs_dpkg
@pytest.mark.timeout(120)
@GENERATED
@given(st.lists(version_pairs, min_size=100, max_size=150))
def test_generated_pairs_agree_with_dpkg(pairs: list[tuple[str, str]]) -> None:
    ours = [compare_versions(a, b) for a, b in pairs]
    theirs = dpkg_compare_batch(pairs)
    disagreements = [(a, b, mine, dpkg) for (a, b), mine, dpkg in zip(pairs, ours, theirs, strict=True) if mine != dpkg]
    assert not disagreements, f"(a, b, ours, dpkg): {disagreements[:10]}"


@needs_dpkg
@pytest.mark.timeout(120)
@GENERATED
@given(st.lists(st.text(alphabet="0123456789aZ.+~-:_/$", min_size=1, max_size=8), min_size=100, max_size=150))
def test_we_accept_exactly_what_dpkg_accepts_without_warning(texts: list[str]) -> None:
    def accepted(text: str) -> bool:
        try:
            parse_version(text)
        except InvalidArgument:
            return False
        return True

    def signed_epoch(text: str) -> bool:
        # dpkg reads the epoch with strtol(), which takes "+8:" and "-0:"; we refuse a signed epoch on purpose.
        return ":" in text and text[0] in "+-"

    ours = [accepted(text) for text in texts]
    theirs = dpkg_accepts_batch(texts)
    disagreements = [
        (text, mine, dpkg)
        for text, mine, dpkg in zip(texts, ours, theirs, strict=True)
        if mine != dpkg and not (dpkg and signed_epoch(text))
    ]
    assert not disagreements, f"(text, ours, dpkg): {disagreements[:10]}"


@settings(max_examples=300, deadline=None)
@given(version_texts(), version_texts(), version_texts())
def test_ordering_is_a_total_order_consistent_with_hash(a: str, b: str, c: str) -> None:
    va, vb, vc = parse_version(a), parse_version(b), parse_version(c)
    assert va.compare(vb) == -vb.compare(va)
    assert va.compare(va) == 0
    if va <= vb <= vc:
        assert va <= vc
    if va == vb:
        assert hash(va) == hash(vb)
    assert sorted([va, vb, vc]) == sorted([vc, vb, va])


@settings(max_examples=500, deadline=None)
@given(version_texts().flatmap(lambda text: st.tuples(st.just(text), nearby_version_texts(text))))
def test_hash_key_matches_equality_on_near_pairs(pair: tuple[str, str]) -> None:
    # Near pairs are often equal (an inserted leading zero, a trailing ".0" vs "."): the key must track that both ways.
    va, vb = (parse_version(text) for text in pair)
    same_key = (va.epoch, _equality_key(va.upstream), _equality_key(va.revision)) == (
        vb.epoch,
        _equality_key(vb.upstream),
        _equality_key(vb.revision),
    )
    assert (va == vb) == same_key
    if va == vb:
        assert hash(va) == hash(vb)


@settings(max_examples=300, deadline=None)
@given(version_texts())
def test_str_round_trips(text: str) -> None:
    version = parse_version(text)
    again = parse_version(str(version))
    assert (again.epoch, again.upstream, again.revision) == (version.epoch, version.upstream, version.revision)
