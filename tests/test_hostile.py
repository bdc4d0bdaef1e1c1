"""Hostile input (issue 14): each defect an adversarial pass found, with the smallest input that triggered it
and the exact outcome now expected. Item numbers refer to the issue. Items 6 (FLASHPACK_QUEUE_DEPTH) and
11 (mmap + verify through pread) are covered elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch
import xxhash
from safetensors.torch import save_file, save_model
from torch import nn

import flashpack
from flashpack import format as fmt
from flashpack import source
from flashpack.atomic import TEMP_NAME, remove_stale_temp_files
from flashpack.errors import (
    HeaderError,
    LayoutError,
    NotARegularFileError,
    ReadError,
    WeightMapError,
    WriteError,
)
from flashpack.tools import cli
from flashpack.tools.convert import UnsafeShardPathError, UsageError, convert
from flashpack.tools.revert import revert

from _helpers import read_parts, rewrite_weight_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAL_MAGIC = b"FLASHPK\x00"


def run_cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "flashpack", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, errors="surrogateescape")


@pytest.fixture
def good(tmp_path):
    path = str(tmp_path / "good.flashpack")
    flashpack.pack_to_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}, path)
    return path


def fal_file(path, footer: dict | bytes, payload: bytes = bytes(16)) -> str:
    body = footer if isinstance(footer, bytes) else json.dumps(footer).encode()
    with open(path, "wb") as f:
        f.write(payload + body + len(body).to_bytes(8, "little") + FAL_MAGIC)
    return str(path)


def fal_v4_footer(**changes) -> dict:
    doc = {"format": "flashpack_v4",
           "macroblocks": [{"dtype": "float32", "offset_bytes": 0, "length_bytes": 16, "length_elems": 4}],
           "index": [{"name": "x", "shape": [4], "offset": 0, "length": 4, "macroblock": 0}]}
    doc.update(changes)
    return doc


def readers(path):
    """Every entry point that reads a file's weight map."""
    return [lambda: flashpack.read_weight_map(path), lambda: flashpack.load(path),
            lambda: flashpack.load(path, mmap=True), lambda: flashpack.verify(path)]


def expect_all(path, exc, match):
    for fn in readers(path):
        with pytest.raises(exc, match=match) as ei:
            fn()
        assert str(path) in str(ei.value)


# --------------------------------------------------------------------------- 1: shards outside the folder


def _shard_folder(tmp_path, shard_name):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors", "secret": shard_name}}))
    return folder


@pytest.mark.parametrize("name,why", [
    ("../elsewhere/secret.safetensors", "has a '..' component"),
    ("sub/../../secret.safetensors", "has a '..' component"),
    ("/etc/passwd", "is an absolute path"),
])
def test_1_index_naming_a_file_outside_the_folder(tmp_path, name, why):
    (tmp_path / "elsewhere").mkdir()
    save_file({"secret": torch.zeros(1)}, str(tmp_path / "elsewhere" / "secret.safetensors"))
    folder = _shard_folder(tmp_path, name)
    with pytest.raises(UnsafeShardPathError) as ei:
        convert(str(folder), str(tmp_path / "out.flashpack"))
    assert str(ei.value) == (f"{folder}/model.safetensors.index.json: weight_map['secret']: shard file {name!r} {why}; "
                             f"shard files must lie inside the model folder {folder}; fix or delete the index")
    assert not (tmp_path / "out.flashpack").exists()
    p = run_cli("convert", folder, tmp_path / "out.flashpack", "--quiet")
    assert p.returncode == 2 and f"weight_map['secret']: shard file {name!r} {why}" in p.stderr


def test_1_symlink_out_of_the_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    save_file({"secret": torch.zeros(1)}, str(secret))
    folder = _shard_folder(tmp_path, "link.safetensors")
    os.symlink(secret, folder / "link.safetensors")
    with pytest.raises(UnsafeShardPathError, match=re.escape(
            f"weight_map['secret']: shard file 'link.safetensors' resolves to {secret}, outside the model folder "
            f"{folder} (a symlink out of it)")):
        convert(str(folder), str(tmp_path / "out.flashpack"))
    # the single weight file of a folder is held to the same rule
    os.remove(folder / "model.safetensors.index.json")
    os.remove(folder / "model-00001-of-00001.safetensors")
    os.remove(folder / "link.safetensors")
    os.symlink(secret, folder / "model.safetensors")
    with pytest.raises(UnsafeShardPathError, match=re.escape(f"shard file 'model.safetensors' resolves to {secret}")):
        convert(str(folder), str(tmp_path / "out.flashpack"))


def test_1_symlink_inside_the_folder_and_hub_cache_blobs_are_fine(tmp_path):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(3)}, str(repo / "blobs" / "0123"))
    os.symlink("../../blobs/0123", snap / "model.safetensors")
    r = convert(str(snap), str(tmp_path / "out.flashpack"))
    assert r.tensors == 1 and torch.equal(flashpack.load(tmp_path / "out.flashpack")["a"], torch.ones(3))


# --------------------------------------------------------------------------- 2: raw terminal escapes

HOSTILE_KEY = "evil\x1b]0;pwned\x07\x1b[2J\u009b31m\u202egnp.exe"
HOSTILE_ESCAPED = "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202egnp.exe"


def _assert_no_raw_controls(text: str):
    bad = [c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f or c in "\u202e\u2066\u200f"]
    assert not bad, bad


def test_2_metadata_text_and_json_escape_controls(tmp_path):
    path = tmp_path / "m.flashpack"
    w = torch.ones(2)
    flashpack.pack_to_file({HOSTILE_KEY: w, "tied\u2066": w}, path, metadata={"note\x1b[8m": "hidden\u009b2J\u202e"})
    p = run_cli("metadata", path, "--show-index")
    assert p.returncode == 0, p.stderr
    _assert_no_raw_controls(p.stdout)
    assert f"  tied\\u2066 -> {HOSTILE_ESCAPED}" in p.stdout
    assert "  note\\x1b[8m: hidden\\x9b2J\\u202e" in p.stdout
    assert f"  {HOSTILE_ESCAPED}  F32  (2,)" in p.stdout
    p = run_cli("metadata", path, "--json", "--show-index")
    assert p.returncode == 0, p.stderr
    _assert_no_raw_controls(p.stdout)
    assert "\\u009b" in p.stdout and "\\u202e" in p.stdout and "\\u001b" in p.stdout
    doc = json.loads(p.stdout)  # the escapes decode to the very text of the file
    assert doc["aliases"] == {"tied\u2066": HOSTILE_KEY} and doc["metadata"] == {"note\x1b[8m": "hidden\u009b2J\u202e"}
    assert [e["key"] for e in doc["index"]] == [HOSTILE_KEY]


def test_2_error_messages_quoting_keys_are_escaped(tmp_path):
    path = tmp_path / "e\u202ef.flashpack"
    flashpack.pack_to_file({HOSTILE_KEY: torch.ones(2)}, path)
    wm = flashpack.read_weight_map(path)
    with open(path, "r+b") as f:
        f.seek(wm.tensors[HOSTILE_KEY].offset)
        f.write(b"\xff")
    p = run_cli("verify", path)
    assert p.returncode == 1
    _assert_no_raw_controls(p.stderr)
    assert p.stderr.startswith("flashpack verify: error: ") and "e\\u202ef.flashpack: checksum mismatch" in p.stderr
    assert "affected keys: 'evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202egnp.exe'" in p.stderr


def test_2_safe_text_and_safe_json():
    assert cli.safe_text("a\x00b\x7f\u0085\u2028\ud800") == "a\\x00b\\x7f\\x85\\u2028\\ud800"
    doc = {"k\u009b": ["\x1b", "\u202e", "é"]}
    out = cli.safe_json(doc)
    assert json.loads(out) == doc and "é" in out and "\u009b" not in out and "\u202e" not in out


# --------------------------------------------------------------------------- 3: lengths checked before reading


def _limit_checked_before_reading(path, monkeypatch, limit_msg):
    asked = []
    real = source._pread_exact
    monkeypatch.setattr(source, "_pread_exact", lambda fd, n, off, p: asked.append(n) or real(fd, n, off, p))
    t0 = time.perf_counter()
    expect_all(str(path), WeightMapError, limit_msg)
    assert time.perf_counter() - t0 < 30
    assert max(asked) <= fmt.HEADER_NBYTES  # nothing past the header and the fal tail was read


def test_3_sparse_file_claiming_an_8_gib_weight_map(tmp_path, good, monkeypatch):
    claim = 8 << 30
    path = tmp_path / "sparse.flashpack"
    with open(path, "wb") as f:
        f.write(fmt.encode_header(4096 + claim, 4096, claim, 0))
        f.truncate(4096 + claim)
    _limit_checked_before_reading(path, monkeypatch, re.escape(
        f"{path}: weight map of {claim} bytes at byte 4096 exceeds the 268435456-byte limit; "
        f"the file is damaged or hostile (nothing was read)"))
    p = run_cli("metadata", path)
    assert p.returncode == 1 and "exceeds the 268435456-byte limit" in p.stderr and str(path) in p.stderr


def test_3_fal_footer_length_over_the_limit(tmp_path, monkeypatch):
    claim = 1 << 33
    path = tmp_path / "fal.fp"
    with open(path, "wb") as f:
        f.truncate(claim + 100)
        f.seek(claim + 100 - 16)
        f.write(claim.to_bytes(8, "little") + FAL_MAGIC)
    _limit_checked_before_reading(path, monkeypatch, re.escape(
        f"{path}: fal flashpack footer of {claim} bytes at byte 84 exceeds the 268435456-byte limit"))


def test_3_weight_map_read_into_one_preallocated_buffer(good):
    fd = os.open(good, os.O_RDONLY)
    try:
        data = source._pread_exact(fd, 100, 10, good)
    finally:
        os.close(fd)
    assert isinstance(data, bytearray) and bytes(data) == open(good, "rb").read()[10:110]


# --------------------------------------------------------------------------- 4: convert invents no keys


def test_4_ordinary_metadata_equal_to_a_tensor_name_stays_metadata(tmp_path, capsys):
    src = tmp_path / "one.safetensors"
    save_file({"weight": torch.ones(3)}, str(src), metadata={"description": "weight", "license": "mit"})
    assert cli.main(["convert", str(src), "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err
    wm = flashpack.read_weight_map(tmp_path / "one.flashpack")
    assert list(wm.keys()) == ["weight"] and wm.metadata == {"description": "weight", "license": "mit"}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 2)
        self.head = nn.Linear(2, 3, bias=False)
        self.head.weight = self.embed.weight


def test_4_save_model_record_becomes_an_alias_with_a_note(tmp_path, capsys):
    src = tmp_path / "tied.safetensors"
    save_model(Tied(), str(src), metadata={"description": "embed.weight"})
    assert cli.main(["convert", str(src), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err == ("flashpack: note: key 'head.weight' restored as an alias of 'embed.weight' from the safetensors "
                   "metadata record 'head.weight': 'embed.weight' (written by safetensors' save_model or flashpack "
                   "revert); the record is not kept as metadata\n")
    wm = flashpack.read_weight_map(tmp_path / "tied.flashpack")
    assert wm.aliases == {"head.weight": "embed.weight"} and wm.metadata == {"description": "embed.weight"}


# --------------------------------------------------------------------------- 5: FIFO, socket, device


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.flashpack"
    os.mkfifo(path)
    return str(path)


@pytest.mark.timeout(60)
def test_5_fifo_is_not_a_regular_file_everywhere(fifo, tmp_path):
    msg = re.escape(f"{fifo}: not a regular file (a FIFO (named pipe)); flashpack reads regular files only")
    for fn in [*readers(fifo), lambda: flashpack.assign_from_file(nn.Linear(2, 2), fifo),
               lambda: flashpack.load(fifo, backend="threads"), lambda: revert(fifo, str(tmp_path / "o.safetensors"))]:
        with pytest.raises(NotARegularFileError, match=msg) as ei:
            fn()
        assert ei.value.errno == errno.EINVAL and ei.value.filename == fifo
    with pytest.raises(NotARegularFileError, match=msg):
        convert(fifo, str(tmp_path / "o.flashpack"))
    for cmd in ("metadata", "verify", "revert", "convert"):
        p = run_cli(cmd, fifo, timeout=60)
        assert p.returncode == 2 and "not a regular file (a FIFO (named pipe))" in p.stderr, (cmd, p.stderr)


@pytest.mark.timeout(60)
def test_5_fifo_shard_in_a_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(NotARegularFileError, match="model.safetensors: not a regular file"):
        convert(str(folder), str(tmp_path / "o.flashpack"))


def test_5_socket_and_device(tmp_path):
    sock_path = str(tmp_path / "s.flashpack")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    try:
        with pytest.raises((NotARegularFileError, OSError)) as ei:  # open(2) of a socket fails with ENXIO
            flashpack.read_weight_map(sock_path)
        assert isinstance(ei.value, NotARegularFileError) or ei.value.errno == errno.ENXIO
    finally:
        s.close()
    with pytest.raises(NotARegularFileError, match=re.escape("/dev/null: not a regular file (a character device)")):
        flashpack.verify("/dev/null")
    st = os.stat(sock_path)
    with pytest.raises(NotARegularFileError, match=re.escape(f"{sock_path}: not a regular file (a socket)")):
        source.check_regular(st, sock_path)


# --------------------------------------------------------------------------- 7: exception types from hostile JSON

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_7_deep_nesting_in_a_weight_map(good):
    at = flashpack.read_weight_map(good).index_offset
    rewrite_weight_map(good, lambda d: b'{"format":' + DEEP + b"}")
    expect_all(good, WeightMapError, re.escape(f"{good}: weight map at byte {at} is nested too deeply"))
    p = run_cli("verify", good)
    assert p.returncode == 1 and f"{good}: weight map at byte {at} is nested too deeply" in p.stderr


def test_7_deep_nesting_in_a_fal_footer_and_a_shard_index(tmp_path):
    path = fal_file(tmp_path / "f.fp", DEEP)
    expect_all(path, WeightMapError, re.escape(f"{path}: fal flashpack footer at byte 16 is nested too deeply"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map":' + DEEP + b"}")
    with pytest.raises(UsageError, match=re.escape(f"{folder}/model.safetensors.index.json: shard index at byte 0 "
                                                   f"is nested too deeply")):
        convert(str(folder), str(tmp_path / "o.flashpack"))


def test_7_huge_integer(good, tmp_path):
    at = flashpack.read_weight_map(good).index_offset
    rewrite_weight_map(good, lambda d: json.dumps(d).replace('"version": 1', '"version": ' + "9" * 4400).encode())
    expect_all(good, WeightMapError, re.escape(
        f"{good}: weight map at byte {at} is not UTF-8 JSON: an integer of 4400 digits (at most 20 are accepted)"))
    path = fal_file(tmp_path / "f.fp", json.dumps(fal_v4_footer()).replace('"offset": 0,', '"offset": ' + "1" * 4400 + ",").encode())
    expect_all(path, WeightMapError, "fal flashpack footer at byte 16 is not UTF-8 JSON: an integer of 4400 digits")


@pytest.mark.parametrize("metadata", [[1, 2], "text", 7])
def test_7_fal_metadata_not_an_object(tmp_path, metadata):
    path = fal_file(tmp_path / "f.fp", fal_v4_footer(metadata=metadata))
    expect_all(path, WeightMapError, re.escape(
        f"{path}: fal flashpack footer: metadata is a {type(metadata).__name__}, not an object"))


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
def test_7_fal_infinity_and_nan(tmp_path, constant):
    text = json.dumps(fal_v4_footer()).replace('"length": 4,', f'"length": {constant},')
    path = fal_file(tmp_path / "f.fp", text.encode())
    expect_all(path, WeightMapError, re.escape(
        f"{path}: fal flashpack footer at byte 16 is not UTF-8 JSON: {constant} is not JSON "
        f"(NaN and Infinity are not accepted)"))


@pytest.mark.parametrize("value", [1.5, 1.0, "0", True, None])
@pytest.mark.parametrize("where", ["offset", "length", "macroblock"])
def test_7_fal_integers_only(tmp_path, value, where):
    doc = fal_v4_footer()
    doc["index"][0][where] = value
    path = fal_file(tmp_path / "f.fp", doc)
    expect_all(path, WeightMapError, re.escape(
        f"{path}: fal flashpack footer is missing or has a malformed field: index[0] ('x').{where} = {value!r} "
        f"is not a JSON integer"))


def test_7_fal_integers_only_in_macroblocks_and_shapes(tmp_path):
    doc = fal_v4_footer()
    doc["macroblocks"][0]["length_bytes"] = 16.0
    path = fal_file(tmp_path / "f.fp", doc)
    expect_all(path, WeightMapError, re.escape(
        "malformed field: macroblocks[0].length_bytes = 16.0 is not a JSON integer"))
    doc = fal_v4_footer()
    doc["index"][0]["shape"] = [4.0]
    path = fal_file(tmp_path / "g.fp", doc)
    expect_all(path, WeightMapError, re.escape("malformed field: key 'x': shape [4.0] must be a list of JSON integers"))


# --------------------------------------------------------------------------- 8: stride bound


def test_8_zero_size_shape_with_overflowing_strides(good):
    rewrite_weight_map(good, lambda d: d["tensors"].__setitem__("z", {"dtype": "F32", "shape": [0, 2**62, 4],
                                                                       "offset": 0, "nbytes": 0}))
    expect_all(good, LayoutError, re.escape(
        f"{good}: key 'z': shape [0, {2**62}, 4] cannot be built: the product of its dimensions (0 counted as 1) "
        f"exceeds 2**63 - 1, so its strides overflow int64"))


def test_8_large_but_buildable_empty_shape_loads(good):
    rewrite_weight_map(good, lambda d: d["tensors"].__setitem__("z", {"dtype": "F32", "shape": [2**62, 0, 1],
                                                                       "offset": 0, "nbytes": 0}))
    assert flashpack.verify(good).tensors == 3
    assert flashpack.load(good)["z"].shape == (2**62, 0, 1)


# --------------------------------------------------------------------------- 9: torch loader errors


@pytest.mark.parametrize("exc", [KeyError(10), IndexError("list index out of range"), AssertionError(),
                                 struct.error("unpack requires a buffer of 4 bytes"), TypeError("bad")])
def test_9_torch_loader_errors_become_one_named_line(tmp_path, monkeypatch, capsys, exc):
    src = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, src)

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(torch, "load", boom)
    assert cli.main(["convert", str(src), "--quiet"]) == 2
    err = capsys.readouterr().err
    first = (str(exc).strip().splitlines() or [""])[0]
    assert err == (f"flashpack convert: error: {src}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                   f"{first}); check that the file is complete\n")


def test_9_damaged_pt_files(tmp_path, capsys):
    src = tmp_path / "w.pt"
    torch.save({"a": torch.arange(10), "b": torch.ones(3, 3)}, src)
    data = src.read_bytes()
    for i in range(0, len(data), max(1, len(data) // 40)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        src.write_bytes(bytes(bad))
        rc = cli.main(["convert", str(src), str(tmp_path / "o.flashpack"), "--quiet", "--force"])
        err = capsys.readouterr().err
        assert rc == 0 or (rc == 2 and err.startswith(f"flashpack convert: error: {src}: ") and err.count("\n") == 1), err


@pytest.mark.parametrize("weight_map,msg", [
    ({}, "its 'weight_map' is empty"),
    ({"a": 3}, "weight_map['a'] is 3, not a file name"),
    ([], "no 'weight_map' object"),
])
def test_9_unusable_index(tmp_path, weight_map, msg):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UsageError, match=re.escape(f"{folder}/model.safetensors.index.json: not a usable shard index")
                       + ".*" + re.escape(msg)):
        convert(str(folder), str(tmp_path / "o.flashpack"))


# --------------------------------------------------------------------------- 10: read and write errors named


def test_10_header_and_weight_map_read_errors_name_file_and_offset(good, monkeypatch):
    wm = flashpack.read_weight_map(good)

    def eio_at(offset):
        real = os.preadv

        def preadv(fd, bufs, off):
            if off == offset:
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, bufs, off)
        return preadv

    for offset, nbytes in ((0, 4096), (wm.index_offset, wm.index_nbytes)):
        monkeypatch.setattr(source.os, "preadv", eio_at(offset))
        with pytest.raises(ReadError) as ei:
            flashpack.read_weight_map(good)
        assert ei.value.errno == errno.EIO and ei.value.filename == good
        assert ei.value.strerror == f"read of {nbytes} bytes at byte offset {offset} failed: Input/output error"
        monkeypatch.undo()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_10_enospc_names_the_destination(tmp_path, good, monkeypatch, code):
    dst = tmp_path / "dst.flashpack"
    dst.write_bytes(b"old")
    real = os.write

    def write(fd, data):
        if len(data) > 100:
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(WriteError) as ei:
        flashpack.pack_to_file({"a": torch.ones(1000)}, dst)
    monkeypatch.undo()
    assert ei.value.errno == code and ei.value.filename == str(dst)
    assert ei.value.strerror.startswith(f"writing {dst} failed: {os.strerror(code)} (nothing was written over {dst}")
    assert dst.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["dst.flashpack", "good.flashpack"]


def test_10_enospc_in_revert_names_the_destination(tmp_path, good, monkeypatch, capsys):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    dst = tmp_path / "back.safetensors"
    assert cli.main(["revert", good, str(dst)]) == 1
    assert capsys.readouterr().err == (f"flashpack revert: error: writing {dst} failed: No space left on "
                                       f"device (nothing was written over {dst}; free space or fix the disk, then try "
                                       f"again)\n")
    assert not dst.exists()


# --------------------------------------------------------------------------- 12: sub-byte dtypes


@pytest.mark.parametrize("dst", ["out.pt", "out.safetensors"])
def test_12_sub_byte_ints_refused_with_a_correct_message(tmp_path, dst):
    path = tmp_path / "s.flashpack"
    flashpack.pack_to_file({"q": torch.zeros(4, dtype=torch.uint8).view(torch.uint4)}, path)
    with pytest.raises(UsageError) as ei:
        revert(str(path), str(tmp_path / dst))
    assert str(ei.value) == (f"{path}: dtype(s) ['U4'] (e.g. key 'q') cannot be reverted: neither safetensors nor "
                             f"torch.save (.pt) can store sub-byte integer dtypes; load the file with flashpack.load instead")
    assert not (tmp_path / dst).exists()


# --------------------------------------------------------------------------- 13: keys that are not UTF-8 text


@pytest.mark.parametrize("where", ["tensor", "alias", "metadata"])
def test_13_lone_surrogate_refused_at_decode(good, where):
    def mutate(d):
        if where == "tensor":
            d["tensors"]["\ud800"] = d["tensors"].pop("b")
        elif where == "alias":
            d["aliases"]["\ud800"] = "w"
        else:
            d["metadata"]["k"] = "\udfff"
        return json.dumps(d).encode()  # ensure_ascii: the surrogate travels as an escape

    rewrite_weight_map(good, mutate)
    what = {"tensor": "key '\\ud800'", "alias": "alias '\\ud800'", "metadata": "metadata['k'] value '\\udfff'"}[where]
    expect_all(good, WeightMapError, re.escape(f"{good}: {what} is not valid UTF-8 text (it holds a lone surrogate)"))


def test_13_fal_key_lone_surrogate(tmp_path):
    doc = fal_v4_footer()
    doc["index"][0]["name"] = "\ud800"
    path = fal_file(tmp_path / "f.fp", json.dumps(doc).encode())
    expect_all(path, WeightMapError, re.escape(f"{path}: key '\\ud800' is not valid UTF-8 text"))


# --------------------------------------------------------------------------- 14: temp files of dead writers

_WRITER = """
import sys, time
from flashpack.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    open(tmp, "wb").write(b"partial")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _writer(dst):
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(dst)], stdout=subprocess.PIPE, text=True, env=env)
    return p, p.stdout.readline().strip()


def test_14_killed_writer_temp_removed_by_the_next_save_live_one_kept(tmp_path):
    dst = tmp_path / "m.flashpack"
    live, live_tmp = _writer(tmp_path / "other.flashpack")
    dead, dead_tmp = _writer(dst)  # its start-up cleaning leaves the live writer's file alone
    assert os.path.exists(live_tmp)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    try:
        assert TEMP_NAME.fullmatch(os.path.basename(dead_tmp)) and os.path.exists(dead_tmp)
        # names that are not ours (or not regular files) are never touched
        keep = [tmp_path / ".m.flashpack.abcdefgh.tmp", tmp_path / "notes.tmp", tmp_path / ".x.fpk-abcdefgh.tmp.bak"]
        for k in keep:
            k.write_bytes(b"user data")
        os.mkdir(tmp_path / ".d.fpk-abcdefgh.tmp")
        flashpack.pack_to_file({"a": torch.ones(2)}, dst)
        assert not os.path.exists(dead_tmp)
        assert os.path.exists(live_tmp)  # its writer holds the lock
        assert all(k.read_bytes() == b"user data" for k in keep) and os.path.isdir(tmp_path / ".d.fpk-abcdefgh.tmp")
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temp_files(str(tmp_path)) == [live_tmp]
    assert sorted(os.listdir(tmp_path)) == sorted([".d.fpk-abcdefgh.tmp", ".m.flashpack.abcdefgh.tmp",
                                                   ".x.fpk-abcdefgh.tmp.bak", "m.flashpack", "notes.tmp"])


def test_14_lock_held_in_this_process_is_respected(tmp_path):
    tmp = tmp_path / ".a.flashpack.fpk-zzzzzzzz.tmp"
    tmp.write_bytes(b"x")
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert remove_stale_temp_files(str(tmp_path)) == []
    finally:
        os.close(fd)
    assert remove_stale_temp_files(str(tmp_path)) == [str(tmp)]


# --------------------------------------------------------------------------- 15: leniency tightened


@pytest.mark.parametrize("bad", [lambda s: " " + s[1:], lambda s: "-" + s[1:], lambda s: "0x" + s[2:],
                                 lambda s: s[:4] + "_" + s[5:], lambda s: s.upper().replace("0", "A") if s.upper() != s else "ABCDEF0123456789",
                                 lambda s: "+" + s[1:]])
def test_15_checksum_strings_are_16_lowercase_hex_digits(good, bad):
    doc = rewrite_weight_map(good, lambda d: d["blocks"][0].__setitem__("checksums", [bad(d["blocks"][0]["checksums"][0])]))
    value = doc["blocks"][0]["checksums"][0]
    expect_all(good, WeightMapError, re.escape(
        f"{good}: blocks[0] (F32) checksums[0] = {value!r} is not 16 hex digits (lowercase, nothing else)"))


def test_15_reserved_header_bytes_must_be_zero(good):
    with open(good, "r+b") as f:
        f.seek(1000)
        f.write(b"\x01")
    expect_all(good, HeaderError, re.escape(
        f"{good}: reserved header byte 1000 is not zero (bytes [56, 4096) must be zero); the file is damaged"))
    header, _, _ = read_parts(good)  # the checksummed fields are intact: only the reserved byte is wrong
    assert header.index_offset > 4096


# --------------------------------------------------------------------------- 11: mmap=True with verify reads through pread


def test_11_mmap_verify_turns_an_unreadable_chunk_into_a_read_error(tmp_path, monkeypatch):
    """With ``verify=True`` every chunk is read with pread before the mapping is handed out, so an EIO (a page
    the disk cannot read) is a ReadError naming file and offset, never a SIGBUS on first touch."""
    import errno as _errno

    import flashpack.source as src

    path = tmp_path / "m.flashpack"
    flashpack.pack_to_file({"a": torch.arange(3 * 2**20, dtype=torch.int32)}, path, chunk_nbytes=2**20)
    wm = flashpack.read_weight_map(path)
    bad = wm.blocks[0].offset + 2**20  # the second checksum chunk
    real = os.preadv

    def preadv(fd, bufs, offset):
        if offset == bad:
            raise OSError(_errno.EIO, "Input/output error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(src.os, "preadv", preadv)
    with pytest.raises(flashpack.ReadError) as ei:
        flashpack.load(path, mmap=True, verify=True)
    assert ei.value.errno == _errno.EIO and ei.value.filename == str(path)
    assert f"at byte offset {bad} failed" in str(ei.value)
    monkeypatch.setattr(src.os, "preadv", real)
    out = flashpack.load(path, mmap=True, verify=True)
    assert torch.equal(out["a"], torch.arange(3 * 2**20, dtype=torch.int32))
