"""C2SP signed notes and tlog checkpoints (anchoring.note).

Published vectors: the PeterNeumann and EnochRoot keys and signatures of golang.org/x/mod
sumdb/note (note_test.go: TestNewVerifier, TestSign, TestOpen) and the example checkpoint of
C2SP tlog-checkpoint.md.
"""

from __future__ import annotations

import base64
import hashlib
import itertools

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from anchoring.encoding import b64
from anchoring.note import (
    MAX_NOTE_BYTES,
    Checkpoint,
    Signer,
    Verifier,
    key_id,
    load_private_key,
    open_checkpoint,
    open_note,
    parse_checkpoint,
    parse_verifier_key,
    private_key_pem,
    verifier_key_string,
)
from anchoring.verify import (
    BAD_SIGNATURE,
    MALFORMED,
    ORIGIN_MISMATCH,
    UNKNOWN_KEY,
    VerificationError,
)

EM_DASH = "\u2014"

# golang.org/x/mod/sumdb/note note_test.go
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    f"{EM_DASH} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotp"
    "RZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    f"{EM_DASH} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLo"
    "x33WWd1RvMc+QQ=\n"
)


def published_verifier(vkey: str) -> Verifier:
    """The Verifier of a published key, built without the parser under test."""
    name, hex_id, key = vkey.split("+")
    return Verifier(
        name, bytes.fromhex(hex_id), Ed25519PublicKey.from_public_bytes(base64.b64decode(key)[1:])
    )


PETER = published_verifier(PETER_VKEY)
ENOCH = published_verifier(ENOCH_VKEY)


def peter_signer() -> Signer:
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert raw[0] == 0x01 and len(raw) == 33  # algorithm byte, then the Ed25519 seed
    return Signer("PeterNeumann", Ed25519PrivateKey.from_private_bytes(raw[1:]))


def seeded_key(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())


_SIGNERS = itertools.count()


def new_signer(name: str) -> Signer:
    """A fresh signer; keys are seeded by a counter so that every run uses the same keys."""
    return Signer(name, seeded_key(f"{name} {next(_SIGNERS)}".encode()))


def check_of(fn, *args, **kwargs) -> str:
    """The name of the check that fn(*args, **kwargs) fails with."""
    with pytest.raises(VerificationError) as info:
        fn(*args, **kwargs)
    return info.value.check


# --- Keys ----------------------------------------------------------------------------------


def test_key_id_is_sha256_of_name_newline_type_byte_and_public_key_truncated_to_4_bytes():
    pub = bytes(range(32))
    want = hashlib.sha256(b"log.example/a\n\x01" + pub).digest()[:4]
    assert key_id("log.example/a", pub) == want
    assert key_id("log.example/b", pub) != want


def test_key_ids_of_published_keys_match_their_verifier_key_strings():
    for vkey in (PETER_VKEY, ENOCH_VKEY):
        name, hex_id, key = vkey.split("+")
        raw = base64.b64decode(key)
        assert key_id(name, raw[1:]).hex() == hex_id


def test_verifier_key_string_reproduces_published_key():
    raw = base64.b64decode(PETER_VKEY.split("+")[2])
    assert verifier_key_string("PeterNeumann", raw[1:]) == PETER_VKEY
    assert peter_signer().verifier_key == PETER_VKEY


def test_verifier_key_string_round_trips_through_parse_verifier_key():
    for i in range(64):
        signer = Signer("rx.example/log", seeded_key(b"%d" % i))
        verifier = parse_verifier_key(signer.verifier_key)
        assert verifier.name == "rx.example/log"
        assert verifier.key_id == signer.key_id
        raw = verifier.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert raw == signer.public_bytes
    assert parse_verifier_key(PETER_VKEY + "\n").key_id == PETER.key_id


def test_verifier_key_whose_base64_contains_a_plus_parses():
    # Standard base64 uses "+", so about half of all Ed25519 verifier keys contain one after the
    # key ID; the signed-note format splits only at the first two "+" (Go's note.NewVerifier).
    signer = next(
        s
        for s in (Signer("log", seeded_key(b"%d" % i)) for i in range(100))
        if "+" in s.verifier_key.split("+", 2)[2]
    )
    verifier = parse_verifier_key(signer.verifier_key)
    assert open_note(signer.sign_note("hi\n"), [verifier]) == ("hi\n", ["log"])


def test_every_truncation_and_single_character_change_of_a_verifier_key_is_malformed():
    # TestNewVerifier's manglings.
    for i in range(len(PETER_VKEY) + 1):
        for j in range(i + 1, len(PETER_VKEY) + 1):
            if (i, j) != (0, len(PETER_VKEY)):
                assert check_of(parse_verifier_key, PETER_VKEY[i:j]) == MALFORMED, (i, j)
    for i, ch in enumerate(PETER_VKEY):
        mangled = PETER_VKEY[:i] + chr(ord(ch) + 1) + PETER_VKEY[i + 1 :]
        assert check_of(parse_verifier_key, mangled) == MALFORMED, mangled


def test_verifier_key_of_wrong_length_or_unknown_algorithm_is_malformed_even_with_matching_id():
    # TestNewVerifier: both strings carry the key ID adjusted to their (bad) key bytes.
    for vkey in (
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ):
        assert check_of(parse_verifier_key, vkey) == MALFORMED


@pytest.mark.parametrize(
    "name", ["", "a+b", "a b", "a\tb", "a\nb", "a\u00a0b", "a\u2003b", "a\x01b"]
)
def test_key_names_must_be_non_empty_without_plus_or_spaces(name):
    with pytest.raises(ValueError):
        Signer(name, Ed25519PrivateKey.generate())
    with pytest.raises(ValueError):
        verifier_key_string(name, bytes(32))


def test_private_key_pem_round_trips_and_only_ed25519_is_accepted():
    key = Ed25519PrivateKey.generate()
    loaded = load_private_key(private_key_pem(key))
    assert Signer("a", loaded).public_bytes == Signer("a", key).public_bytes
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError):
        load_private_key(ec_pem)


# --- Signing and opening notes -------------------------------------------------------------


def test_signing_reproduces_the_published_golang_signed_note():
    assert peter_signer().sign_note(TEXT) == TEXT + "\n" + PETER_SIG


def test_sign_note_requires_text_ending_in_a_newline():
    with pytest.raises(ValueError):
        peter_signer().sign_note("abc")


def test_open_note_verifies_published_signatures_and_ignores_unknown_ones():
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(note, [PETER]) == (TEXT, ["PeterNeumann"])
    assert open_note(note, [ENOCH]) == (TEXT, ["EnochRoot"])
    assert open_note(note, [PETER, ENOCH]) == (TEXT, ["PeterNeumann", "EnochRoot"])
    assert check_of(open_note, note, []) == UNKNOWN_KEY


def test_published_signature_with_inserted_bytes_is_a_bad_signature():
    # TestOpen "Invalid signature": "ABCD" inserted at byte 60 keeps the key ID intact.
    raw = PETER_SIG.encode()
    bad = (raw[:60] + b"ABCD" + raw[60:]).decode()
    assert check_of(open_note, TEXT + "\n" + bad, [PETER]) == BAD_SIGNATURE


def test_signature_sharing_only_the_name_or_only_the_key_id_of_a_known_key_is_ignored():
    # TestOpen: a signature renamed to another key, and one whose key ID bytes were changed.
    misnamed = PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    wrong_id = PETER_SIG.replace("x08g", "xxxx")
    for sig in (misnamed, wrong_id):
        assert check_of(open_note, TEXT + "\n" + sig, [PETER]) == UNKNOWN_KEY
        assert open_note(TEXT + "\n" + sig + PETER_SIG, [PETER]) == (TEXT, ["PeterNeumann"])


def test_sign_and_open_round_trip_with_blank_lines_in_the_text():
    # The text of C2SP signed-note.md's example: blank lines inside the text are allowed, the
    # last blank line separates the signatures.
    text = "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n"
    signer = new_signer("quasimodo.example/salvatore")
    assert open_note(signer.sign_note(text), [signer.verifier()]) == (text, [signer.name])


def test_signatures_from_unknown_keys_are_ignored_when_a_known_key_signs():
    log, witness, stranger = new_signer("log"), new_signer("witness"), new_signer("stranger")
    text = "rx.example/log\n3\n" + b64(bytes(32)) + "\n"
    note = stranger.sign_note(text) + witness.signature_line(text) + log.signature_line(text)
    assert open_note(note, [log.verifier()]) == (text, ["log"])
    assert open_note(note, [witness.verifier(), log.verifier()]) == (text, ["witness", "log"])


def test_a_parsed_verifier_key_opens_notes_of_its_signer():
    note = peter_signer().sign_note("hello\n")
    assert open_note(note, [parse_verifier_key(PETER_VKEY)]) == ("hello\n", ["PeterNeumann"])


def test_note_signed_only_by_other_keys_is_an_unknown_key():
    note = new_signer("other").sign_note("hello\n")
    assert check_of(open_note, note, [new_signer("log").verifier()]) == UNKNOWN_KEY
    same_name_other_key = new_signer("log").sign_note("hello\n")
    assert check_of(open_note, same_name_other_key, [new_signer("log").verifier()]) == UNKNOWN_KEY


def test_tampered_note_text_is_a_bad_signature():
    signer = new_signer("log")
    note = signer.sign_note("rx.example/log\n3\nAAAA\n")
    tampered = note.replace("\n3\n", "\n4\n", 1)
    assert check_of(open_note, tampered, [signer.verifier()]) == BAD_SIGNATURE


def test_signature_by_a_known_key_that_fails_rejects_the_note_even_if_another_verifies():
    log, witness = new_signer("log"), new_signer("witness")
    text = "hello\n"
    forged = f"{EM_DASH} witness {b64(witness.key_id + bytes(64))}\n"
    note = log.sign_note(text) + forged
    assert check_of(open_note, note, [log.verifier(), witness.verifier()]) == BAD_SIGNATURE
    assert open_note(note, [log.verifier()]) == (text, ["log"])


def test_a_verifier_whose_key_does_not_match_its_id_rejects_the_signature():
    signer = new_signer("log")
    impostor = Verifier("log", signer.key_id, Ed25519PrivateKey.generate().public_key())
    assert check_of(open_note, signer.sign_note("hi\n"), [impostor]) == BAD_SIGNATURE


PETER_SIG_B64 = PETER_SIG.split(" ")[2]  # with its newline

MALFORMED_NOTES = {
    # TestOpen badMsgs (the invalid-UTF-8 one has no str counterpart).
    "text only": TEXT,
    "blank line but no signatures": TEXT + "\n",
    "no final newline": TEXT + "\n" + PETER_SIG[:-1],
    "control character in text": "\x01" + TEXT + "\n" + PETER_SIG,
    "name with space and no newline": f"{TEXT}\n{EM_DASH} Bad Name {PETER_SIG_B64[:-1]}",
    "unexpected line after signatures": TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    # Our own.
    "no blank line": TEXT + PETER_SIG,
    "hyphen instead of em dash": TEXT + "\n" + "-" + PETER_SIG[1:],
    "en dash instead of em dash": TEXT + "\n" + "\u2013" + PETER_SIG[1:],
    "no space after em dash": TEXT + "\n" + EM_DASH + PETER_SIG[2:],
    "bad base64": TEXT + "\n" + PETER_SIG.replace("x08go/", "x08go*"),
    "unpadded base64": TEXT + "\n" + PETER_SIG.replace("AM=\n", "AM\n"),
    "signature of a key ID alone": f"{TEXT}\n{EM_DASH} PeterNeumann x08gow==\n",
    "empty key name": f"{TEXT}\n{EM_DASH}  {PETER_SIG_B64}",
    "tab in text": "a\tb\n\n" + PETER_SIG,
    "carriage return in text": "a\r\n\n" + PETER_SIG,
    "delete character in text": "a\x7fb\n\n" + PETER_SIG,
    "crlf line endings": TEXT.replace("\n", "\r\n") + "\r\n" + PETER_SIG.replace("\n", "\r\n"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_NOTES))
def test_malformed_note_is_rejected_as_malformed_input(case):
    assert check_of(open_note, MALFORMED_NOTES[case], [PETER]) == MALFORMED


def test_note_larger_than_the_limit_is_malformed():
    signer = new_signer("log")
    note = signer.sign_note("x" * MAX_NOTE_BYTES + "\n")
    assert check_of(open_note, note, [signer.verifier()]) == MALFORMED


def test_a_note_with_more_than_100_signature_lines_is_malformed():
    # As Go's sumdb/note: a note cannot make a verifier check signatures without end.
    signer = new_signer("log")
    note = signer.sign_note(TEXT)
    extra = f"{EM_DASH} Other {PETER_SIG_B64}"  # with its newline
    assert open_note(note + extra * 99, [signer.verifier()])[1] == ["log"]
    assert check_of(open_note, note + extra * 100, [signer.verifier()]) == MALFORMED


def test_control_character_in_a_signature_line_is_malformed():
    # C2SP signed-note: signed notes MUST NOT contain ASCII control characters other than
    # newline, anywhere, so this holds for the line of an unknown key too.
    note = f"{TEXT}\n{EM_DASH} Other\x01Key {PETER_SIG_B64}{PETER_SIG}"
    assert check_of(open_note, note, [PETER]) == MALFORMED


def test_signature_line_whose_key_name_contains_a_space_is_malformed():
    # C2SP signed-note: key names MUST NOT contain Unicode spaces. Go's note.Open splits the
    # line at the first space and rejects it; a verifier must not accept what it rejects.
    note = f"{TEXT}\n{EM_DASH} Bad Name {PETER_SIG_B64}{PETER_SIG}"
    assert check_of(open_note, note, [PETER]) == MALFORMED


# --- Checkpoints ---------------------------------------------------------------------------

ROOT = hashlib.sha256(b"root").digest()


def test_checkpoint_text_is_origin_size_and_base64_root_lines():
    cp = Checkpoint("rx.example/log", 42, ROOT)
    assert cp.text() == f"rx.example/log\n42\n{base64.b64encode(ROOT).decode()}\n"
    assert Checkpoint("o", 0, ROOT, ("ext one", "ext two")).text().endswith("\next one\next two\n")


def test_parse_checkpoint_round_trips_with_and_without_extension_lines():
    for cp in (
        Checkpoint("rx.example/log", 0, ROOT),
        Checkpoint("rx.example/log", 1, ROOT),
        Checkpoint("rx.example/log", 18446744073709551615, ROOT),
        Checkpoint("rx.example/log", 7, ROOT, ("timestamp 1700000000", "— not a signature")),
    ):
        assert parse_checkpoint(cp.text()) == cp


# C2SP tlog-checkpoint.md
C2SP_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)
C2SP_SIGNATURE = (
    "Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8="
)


def test_parse_checkpoint_reads_the_published_c2sp_example():
    cp = parse_checkpoint(C2SP_CHECKPOINT)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert cp.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.text() == C2SP_CHECKPOINT


def test_published_c2sp_checkpoint_note_is_well_formed_and_signed_by_a_key_we_do_not_know():
    note = f"{C2SP_CHECKPOINT}\n{EM_DASH} example.com/behind-the-sofa {C2SP_SIGNATURE}\n"
    ours = new_signer("example.com/behind-the-sofa").verifier()
    assert check_of(open_checkpoint, note, [ours]) == UNKNOWN_KEY
    # A verifier claiming the signature's name and key ID must check it (and, lacking the
    # real key, reject it): the line was parsed as that key's signature.
    kid = base64.b64decode(C2SP_SIGNATURE)[:4]
    claimed = Verifier("example.com/behind-the-sofa", kid, ours.public_key)
    assert check_of(open_checkpoint, note, [claimed]) == BAD_SIGNATURE


def root_line() -> str:
    return base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    "size", ["01", "00", "-1", "x", "", " 1", "1 ", "+1", "1.0", "1e3", "0x10"]
)
def test_checkpoint_size_that_is_not_a_plain_decimal_is_malformed(size):
    assert check_of(parse_checkpoint, f"o\n{size}\n{root_line()}\n") == MALFORMED


@pytest.mark.parametrize("size", [str(2**64), "9" * 21, "1" * 5000])
def test_checkpoint_size_beyond_a_uint64_is_malformed(size):
    # A size of thousands of digits must not reach int() either (Python refuses more than
    # 4300 digits with a ValueError).
    assert check_of(parse_checkpoint, f"o\n{size}\n{root_line()}\n") == MALFORMED


def test_the_largest_checkpoint_size_parses():
    assert parse_checkpoint(f"o\n{2**64 - 1}\n{root_line()}\n").size == 2**64 - 1


@pytest.mark.parametrize("size", ["\u00b2", "\u0661\u0662", "\uff11\uff12"])
def test_checkpoint_size_with_non_ascii_digits_is_malformed(size):
    # C2SP tlog-checkpoint: the size is the ASCII decimal representation. Superscript two,
    # Arabic-Indic and fullwidth digits are str.isdigit() but not ASCII.
    assert check_of(parse_checkpoint, f"o\n{size}\n{root_line()}\n") == MALFORMED


@pytest.mark.parametrize(
    "root",
    [
        "",
        "not base64!",
        base64.b64encode(ROOT).decode().rstrip("="),
        base64.b64encode(ROOT[:31]).decode(),
        base64.b64encode(ROOT + b"\x00").decode(),
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),
    ],
)
def test_checkpoint_root_that_is_not_base64_of_32_bytes_is_malformed(root):
    assert check_of(parse_checkpoint, f"o\n1\n{root}\n") == MALFORMED


@pytest.mark.parametrize(
    "text",
    [
        "",
        "o\n1\n",
        "o\n1\n{root}",
        "\n1\n{root}\n",
        "o\n1\n{root}\nextension",
    ],
)
def test_checkpoint_with_missing_lines_empty_origin_or_no_final_newline_is_malformed(text):
    assert check_of(parse_checkpoint, text.format(root=root_line())) == MALFORMED


def test_checkpoint_with_an_empty_extension_line_is_malformed():
    # C2SP tlog-checkpoint: "Extension lines, if any, MUST be non-empty." Such a text can reach
    # parse_checkpoint: a note's text ends at its last blank line, not its first.
    text = f"o\n1\n{root_line()}\n\nextension\n"
    signer = new_signer("log")
    assert open_note(signer.sign_note(text), [signer.verifier()])[0] == text
    assert check_of(parse_checkpoint, text) == MALFORMED


def test_open_checkpoint_verifies_parses_and_checks_the_origin():
    signer = new_signer("rx.example/log")
    cp = Checkpoint("rx.example/log", 5, ROOT, ("ext",))
    note = signer.sign_note(cp.text())
    assert open_checkpoint(note, [signer.verifier()]) == cp
    assert open_checkpoint(note, [signer.verifier()], origin="rx.example/log") == cp
    check = check_of(open_checkpoint, note, [signer.verifier()], origin="rx.example/other")
    assert check == ORIGIN_MISMATCH


def test_open_checkpoint_checks_the_signature_before_the_body():
    signer = new_signer("log")
    note = signer.sign_note("o\nnot a size\nAAAA\n")
    assert check_of(open_checkpoint, note, [new_signer("log").verifier()]) == UNKNOWN_KEY
    assert check_of(open_checkpoint, note, [signer.verifier()]) == MALFORMED
