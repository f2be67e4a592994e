"""Asterisk config files: the strict reader, the idempotent #include edit that never
corrupts a file it does not understand, atomic writes keeping owner and mode, tm4's
manager user and its secret in tm4.toml."""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest

from tm4.asterisk.amiuser import (
    MANAGER_FILE,
    ami_enabled,
    defined_elsewhere,
    ensure_manager_user,
    include_secret,
    set_toml_secret,
)
from tm4.asterisk.conffile import (
    ConfParseError,
    atomic_write,
    ensure_include,
    parse_conf,
    read_conf,
)
from tm4.core.errors import ConfigError, ConflictError

ETC = Path(__file__).parent.parent / "fixtures" / "asterisk" / "etc"
INC = "acl_tm4.conf"


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "asterisk"
    shutil.copytree(ETC, d)
    return d


def backups(d: Path) -> list[Path]:
    return sorted(d.glob("*.bak"))


# -- the reader ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["acl.conf", "manager.conf", "pjsip.conf"])
def test_real_asterisk_files_parse(name: str) -> None:
    text, conf = read_conf(ETC / name)
    assert conf.categories


def test_reader_understands_asterisk_syntax() -> None:
    conf = parse_conf(
        "; comment\n"
        "[general](+) ; trailing\n"
        "enabled = yes\n"
        "exten => 1,1,Noop(x\\;y)\n"
        ";-- a block\n"
        "garbage inside a block is fine\n"
        "--;\n"
        "[tmpl](!)\n"
        "deny=0.0.0.0/0.0.0.0 ;-- inline block --; \n"
        "#include \"other.conf\"\n"
        "#tryinclude <maybe.conf>\n"
        "#exec /bin/true\n"
    )
    assert conf.categories == ["general", "tmpl"]
    assert conf.includes == ["other.conf", "maybe.conf"]
    assert conf.values("general", "exten") == ["1,1,Noop(x;y)"]
    assert conf.values("tmpl", "deny") == ["0.0.0.0/0.0.0.0"]


@pytest.mark.parametrize("text", [
    "[ok]\nthis line means nothing\n",
    "permit = 192.0.2.1\n",  # setting before any category
    "[broken\npermit = 192.0.2.1\n",
    "[ok] trailing words\n",
    "[ok]\n#includes other.conf\n",
    "[ok]\n;-- never closed\n",
    "[ok]\nkey = value\0\n",
])
def test_reader_refuses_what_it_does_not_understand(text: str) -> None:
    with pytest.raises(ConfParseError):
        parse_conf(text)


# -- the include edit -------------------------------------------------------------

def test_include_is_added_once_with_a_backup(etc: Path) -> None:
    acl = etc / "acl.conf"
    original = acl.read_bytes()
    os.chown(acl, 1234, 2345)
    acl.chmod(0o640)
    first = ensure_include(acl, INC, forbid_category="tm4", comment="tm4 ACL")
    assert first.changed and first.backup is not None
    assert first.backup.read_bytes() == original
    after = acl.read_bytes()
    assert after == original + b'; tm4 ACL\n#include "acl_tm4.conf"\n'
    st = acl.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o640)
    bst = first.backup.stat()
    assert (bst.st_uid, bst.st_gid, stat.S_IMODE(bst.st_mode)) == (1234, 2345, 0o640)
    # the original categories are untouched
    assert read_conf(acl)[1].categories == ["lab_acl"]

    second = ensure_include(acl, INC, forbid_category="tm4")
    assert not second.changed and second.backup is None
    assert acl.read_bytes() == after
    assert backups(etc) == [first.backup]


@pytest.mark.parametrize("line", [
    "#include acl_tm4.conf", '#include "acl_tm4.conf"', "#tryinclude <acl_tm4.conf>",
    "#include {dir}/acl_tm4.conf", "  #include   acl_tm4.conf   ; with a comment",
])
def test_an_existing_include_in_any_spelling_counts(etc: Path, line: str) -> None:
    acl = etc / "acl.conf"
    acl.write_text(acl.read_text() + line.format(dir=etc) + "\n")
    before = acl.read_bytes()
    assert not ensure_include(acl, INC).changed
    assert acl.read_bytes() == before and backups(etc) == []


@pytest.mark.parametrize("content", [
    b"[lab_acl]\ndeny = 0.0.0.0/0.0.0.0\nthis is not asterisk config\n",
    b"permit = 192.0.2.1\n",
    b"[lab_acl]\n;-- an unclosed block comment\n",
    b"[lab_acl]\ndeny = \xff\xfe\n",  # not UTF-8
])
def test_a_file_it_cannot_parse_is_left_alone(etc: Path, content: bytes) -> None:
    acl = etc / "acl.conf"
    acl.write_bytes(content)
    with pytest.raises(ConfParseError):
        ensure_include(acl, INC)
    assert acl.read_bytes() == content
    assert backups(etc) == [] and sorted(p.name for p in etc.iterdir() if p.name.startswith("."))== []


def test_a_file_defining_tm4_itself_is_refused(etc: Path) -> None:
    acl = etc / "acl.conf"
    acl.write_text("[tm4]\npermit = 192.0.2.1\n")
    with pytest.raises(ConflictError):
        ensure_include(acl, INC, forbid_category="tm4")
    assert acl.read_text() == "[tm4]\npermit = 192.0.2.1\n"


def test_line_endings_and_a_missing_final_newline_are_respected(etc: Path) -> None:
    acl = etc / "acl.conf"
    acl.write_bytes(b"[lab_acl]\r\ndeny = 0.0.0.0/0.0.0.0")
    ensure_include(acl, INC)
    assert acl.read_bytes() == b'[lab_acl]\r\ndeny = 0.0.0.0/0.0.0.0\r\n#include "acl_tm4.conf"\r\n'


def test_a_missing_acl_conf_is_created_with_the_include(etc: Path) -> None:
    acl = etc / "acl.conf"
    acl.unlink()
    os.chown(etc, 1234, 2345)
    edit = ensure_include(acl, INC)
    assert edit.created and '#include "acl_tm4.conf"' in acl.read_text()
    st = acl.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o640)


def test_atomic_write_keeps_owner_mode_and_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real.conf"
    real.write_text("old\n")
    os.chown(real, 1234, 2345)
    real.chmod(0o604)
    link = tmp_path / "link.conf"
    link.symlink_to(real)
    atomic_write(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    st = real.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o604)
    assert [p.name for p in tmp_path.iterdir() if "tm4tmp" in p.name] == []


# -- tm4's manager user -------------------------------------------------------------

def test_an_admin_defined_user_is_left_alone(etc: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in etc.iterdir()}
    toml = tmp_path / "tm4.toml"
    res = ensure_manager_user(etc, "tm4", toml, "")
    assert res.status == "exists-elsewhere" and res.where == etc / "manager.conf"
    assert {p.name: p.read_bytes() for p in etc.iterdir()} == before and not toml.exists()


def test_manager_user_is_created_least_privilege_and_secret_goes_to_toml(etc: Path, tmp_path: Path) -> None:
    mgr = etc / "manager.conf"
    mgr.write_text(mgr.read_text().replace("[tm4]", "[someoneelse]"))
    toml = tmp_path / "tm4.toml"
    toml.write_text('state_dir = "/var/lib/tm4"\n\n[ami]\nport = 5038\n\n[dns]\nrefresh_min = "60s"\n')
    toml.chmod(0o644)
    res = ensure_manager_user(etc, "tm4", toml, "")
    assert res.status == "created" and res.include_added and res.backup is not None
    conf = parse_conf((etc / MANAGER_FILE).read_text())
    assert conf.categories == ["tm4"]
    assert conf.values("tm4", "read") == ["system,security"]
    assert conf.values("tm4", "write") == ["system"]
    assert conf.values("tm4", "deny") == ["0.0.0.0/0.0.0.0", "::/0"]
    assert conf.values("tm4", "permit") == ["127.0.0.1/255.255.255.255", "::1/128"]
    secret = conf.values("tm4", "secret")[0]
    assert len(secret) >= 32 and include_secret(etc, "tm4") == secret
    assert read_conf(mgr)[1].includes_file(MANAGER_FILE, etc)
    data = tomllib.loads(toml.read_text())
    assert data == {"state_dir": "/var/lib/tm4", "ami": {"port": 5038, "secret": secret},
                    "dns": {"refresh_min": "60s"}}
    assert stat.S_IMODE(toml.stat().st_mode) == 0o600
    assert defined_elsewhere(etc, "tm4") is None  # tm4's own include does not count
    # idempotent with the secret tm4.toml now holds
    again = ensure_manager_user(etc, "tm4", toml, secret)
    assert again.status == "unchanged" and include_secret(etc, "tm4") == secret
    assert len(backups(etc)) == 1
    # a lost tm4.toml secret gets a fresh one, never the old one reused blindly
    fresh = ensure_manager_user(etc, "tm4", toml, "")
    assert fresh.status == "created" and fresh.secret != secret
    assert tomllib.loads(toml.read_text())["ami"]["secret"] == fresh.secret == include_secret(etc, "tm4")


def test_no_manager_conf_means_no_user(etc: Path, tmp_path: Path) -> None:
    (etc / "manager.conf").unlink()
    assert ensure_manager_user(etc, "tm4", tmp_path / "tm4.toml", "").status == "no-manager-conf"
    assert not (etc / MANAGER_FILE).exists() and not (etc / "manager.conf").exists()


def test_ami_enabled_reads_general(etc: Path) -> None:
    assert ami_enabled(etc) is True
    mgr = etc / "manager.conf"
    mgr.write_text(mgr.read_text().replace("enabled = yes", "enabled = no"))
    assert ami_enabled(etc) is False


@pytest.mark.parametrize("before,expected", [
    ("", {"ami": {"secret": "S" * 32}}),
    ('state_dir = "/x"', {"state_dir": "/x", "ami": {"secret": "S" * 32}}),
    ('[ami]\nsecret = "old"\nport = 1\n[guard]\nfailures = 3\n',
     {"ami": {"secret": "S" * 32, "port": 1}, "guard": {"failures": 3}}),
    ('[guard]\nfailures = 3\n\n[ami] # tm4\nhost = "127.0.0.1"\n',
     {"guard": {"failures": 3}, "ami": {"secret": "S" * 32, "host": "127.0.0.1"}}),
])
def test_toml_secret_edit_keeps_everything_else(tmp_path: Path, before: str, expected: dict) -> None:
    p = tmp_path / "etc" / "tm4.toml"
    if before:
        p.parent.mkdir()
        p.write_text(before)
    set_toml_secret(p, "S" * 32)
    assert tomllib.loads(p.read_text()) == expected
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


@pytest.mark.parametrize("before", ['ami = { host = "127.0.0.1" }\n', 'ami.host = "127.0.0.1"\n',
                                    "[ami\nbroken", '[ami]\nsecret = "a"\nsecret = "b"\n'])
def test_toml_layouts_it_cannot_edit_are_refused(tmp_path: Path, before: str) -> None:
    p = tmp_path / "tm4.toml"
    p.write_text(before)
    with pytest.raises(ConfigError):
        set_toml_secret(p, "S" * 32)
    assert p.read_text() == before
