"""flashpack: convert checkpoints to .flashpack files, inspect, revert and verify them.

Usage:
  flashpack convert <src> [<dst>] [--subfolder=<name>] [--variant=<v>] [--dtype=<dtype>] [--ignore-names=<key>...] [--ignore-prefixes=<prefix>...] [--ignore-suffixes=<suffix>...] [--use-diffusers | --use-transformers] [--max-shard-size=<size>] [--force] [--quiet] [--verbose]
  flashpack metadata <path> [--show-index] [--json] [--format=<schema>]
  flashpack revert <path> [<dst>] [--format=<format>] [--one-file] [--force] [--quiet] [--verbose]
  flashpack verify <path>
  flashpack <command> --help
  flashpack (-h | --help)
  flashpack --version

Commands:
  convert    A .safetensors / .pt / .bin / .pth file, a folder of shards, a transformers or diffusers
             model folder, or a Hub repo id (org/name) -> one .flashpack file.
  metadata   Print what a .flashpack file holds (reads only its weight map).
  revert     A .flashpack file -> .safetensors (default) or .pt, exactly.
  verify     Check every invariant and every checksum of a .flashpack file.

Options:
  --subfolder=<name>  Folder inside the model folder or repo (unet, text_encoder...).
  --variant=<v>       Weight variant (fp16, bf16...); without it the default set is used.
  --dtype=<dtype>     Cast floating-point tensors to this dtype (float16, bfloat16, float32...).
  --use-diffusers     Look for diffusers weight files (diffusion_pytorch_model.*).
  --use-transformers  Look for transformers weight files (model.*, pytorch_model.*) and restore the
                      tied weights the model class declares (builds it from config.json on the meta device).
  --ignore-names=<key>         Leave out this key (repeat the flag for more).
  --ignore-prefixes=<prefix>   Leave out keys starting with this (repeatable).
  --ignore-suffixes=<suffix>   Leave out keys ending with this (repeatable).
  --max-shard-size=<size>      convert: write a sharded pack of at most <size> tensor bytes per shard (20GB, 5GiB, keep).
  --one-file          revert: a sharded pack as one file (default: sharded safetensors).
  --format=<format>   revert: safetensors, torch or fal (fal's flashpack 0.4 layout); metadata --json:
                      flashpack (default, a superset of fal's fields) or fal (fal's schema exactly).
  --force             Replace an existing destination.
  --quiet             No progress bar.
  -v --verbose        Accepted for fal's CLI (output is the same).
  -i --show-index     One line per tensor: key, dtype, shape, offset, nbytes.
  -j --json           The same as JSON on stdout.
  -h --help           Show this text.
  --version           Show the version.

Exit status: 0 success (also when the reader of stdout closes it early, as `head` does), 1 a damaged or
failed file, 2 a usage error or unusable input.
Set FLASHPACK_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import traceback

COMMAND_HELP = {
    "convert": """Usage: flashpack convert <src> [<dst>] [--subfolder=<name>] [--variant=<v>] [--dtype=<dtype>]
                         [--ignore-names=<key>...] [--ignore-prefixes=<prefix>...] [--ignore-suffixes=<suffix>...]
                         [--use-diffusers | --use-transformers] [--max-shard-size=<size>] [--force] [--quiet] [-v]

Convert a checkpoint into one .flashpack file, streaming one source file at a time.

  <src>   a .safetensors file; a .pt/.bin/.pth file (torch.load(weights_only=True); of a dict wrapping
          the state_dict, {"state_dict": ..., "epoch": 3}, the other entries are dropped with a note and
          listed in the metadata as flashpack.convert.dropped_entries); a folder of shards with its
          *.index.json; a transformers or diffusers model folder; or a Hub repo id org/name (only the
          needed files are downloaded). A path starting with ., / or ~ is never
          looked up on the Hub.
  <dst>   default: next to the source (model.safetensors -> model.flashpack; a folder ->
          <folder>/model[.<variant>].flashpack; a Hub repo -> ./<name>[-<subfolder>][.<variant>].flashpack).
          Never the source; an existing flashpack file is replaced (as fal's convert does),
          any other existing file only with --force; written atomically.

Options:
  --subfolder=<name>  Folder inside the model folder or repo.
  --variant=<v>       Only the variant's files (model.fp16-00001-of-00002.safetensors or
                      model-00001-of-00002.fp16.safetensors); without it, the default set.
  --dtype=<dtype>     Cast floating-point tensors only (float16, bfloat16, float32...).
  --use-diffusers     Look for diffusion_pytorch_model.* files.
  --use-transformers  Look for model.* / pytorch_model.* files and restore tied weights from config.json.
  --ignore-names=<key>        Leave out this key; repeat the flag for more (fal's filter).
  --ignore-prefixes=<prefix>  Leave out keys starting with <prefix> (repeatable).
  --ignore-suffixes=<suffix>  Leave out keys ending with <suffix> (repeatable).
  --max-shard-size=<size>  Write a sharded pack: NAME-00001-of-0000N.flashpack ... + <dst>.index.json, at most
                      <size> tensor bytes per shard (20GB = 20*10^9, 5GiB, or keep: about the source's shards).
  --force             Replace an existing destination.
  --quiet             No progress bar (also off when stderr is not a terminal).
  -v --verbose        Accepted for fal's CLI; changes nothing.
""",
    "metadata": """Usage: flashpack metadata <path> [-i | --show-index] [-j | --json] [--format=<schema>]

Print the format version, byte order, dtype blocks with byte ranges, tensor count, total bytes,
aliases, user metadata and checksum kind of a .flashpack file (or a fal flashpack file). Reads only
the header and the weight map, whatever the file size.

Options:
  -i --show-index    One line per tensor: key, dtype, shape, offset, nbytes.
  -j --json          The same as JSON on stdout: this library's fields (path, source, format_version,
                     byte_order, file_nbytes, tensors, aliases, payload_nbytes, checksum, blocks, metadata)
                     plus fal's (format, align_bytes, total_payload_bytes, total_elems, macroblocks); with
                     --show-index, index entries carry both {key, dtype, shape, offset, nbytes} and fal's
                     {name, length, macroblock, offset_elems} (offset is bytes in the file here, elements
                     in the block in fal's schema).
  --format=<schema>  With --json: flashpack (default, the superset above) or fal (exactly fal's
                     get_flashpack_file_metadata schema, index offsets in elements).
""",
    "revert": """Usage: flashpack revert <path> [<dst>] [--format=<format>] [--one-file] [--force] [--quiet] [-v]

Write the tensors of a .flashpack file as .safetensors (default) or .pt (<dst> ending in .pt, .pth
or .bin), exactly: dtypes, shapes, user metadata (as safetensors metadata). Aliases are written as
copies and recorded in the metadata (metadata[alias] = target, as safetensors.torch.save_model does).
Default <dst>: the source name with .safetensors (model.flashpack -> model.safetensors). Never the
source; an existing file only with --force; written atomically.

--format fal writes fal's flashpack 0.4 single-file layout instead (default <dst>: model.fal.flashpack),
which fal's flashpack 0.4.5 loads bit-exactly: a way back to fal's library. Aliases become copies.

Options:
  --format=<format>  safetensors, torch or fal; default: from <dst>'s suffix (.pt/.pth/.bin: torch).
  --one-file         A sharded pack (its .flashpack.index.json or folder) as one file; without it, as sharded
                     safetensors (NAME-00001-of-0000N.safetensors + NAME.safetensors.index.json).
  --force            Replace an existing destination.
  --quiet            No progress bar (also off when stderr is not a terminal).
  -v --verbose       Accepted for fal's CLI; changes nothing.
""",
    "verify": """Usage: flashpack verify <path>

Check every invariant of a .flashpack file (header, weight map, layout) and every payload checksum,
and print what was checked. Exit status 0 when the file is sound, 1 when it is damaged (the message
names the first bad block, chunk or key), 2 when it is not a flashpack file.
""",
}

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE = 0, 1, 2

#: Characters never printed raw: C0 controls and DEL, C1 controls (U+0080-U+009F; U+009B is a CSI), the
#: bidi embeddings, overrides, isolates and marks (U+202E reorders what the reader sees), other invisible
#: format characters, line/paragraph separators, and lone surrogates (undecodable bytes of a path).
_UNSAFE_OTHER = r"\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
_UNSAFE = re.compile(rf"[\x00-\x1f{_UNSAFE_OTHER}]")


#: The same set less C0 controls, which ``json.dumps`` already escapes inside strings (and whose ``\\n``
#: outside strings is the output's own layout).
_UNSAFE_JSON = re.compile(rf"[{_UNSAFE_OTHER}]")


def _escape_char(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe_text(text: str) -> str:
    """``text`` with every control, C1, bidi and other invisible format character written as an escape
    (``\\x1b``, ``\\u202e``): what the CLI prints of a file's keys, metadata and paths cannot drive the
    terminal or reorder what the user reads."""
    return _UNSAFE.sub(_escape_char, text)


def safe_json(doc) -> str:
    """``json.dumps`` (non-ASCII text kept readable) with the characters :func:`safe_text` escapes written
    as ``\\uXXXX`` escapes: they can only occur inside JSON strings, where the escape decodes to the
    same text, so the output parses to the same document."""
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _print(*lines: str, file=None) -> None:
    print("\n".join(safe_text(line) for line in lines), file=file)


def _debug() -> bool:
    from ..settings import settings

    try:
        return settings().debug
    except ValueError:
        return os.environ.get("FLASHPACK_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _progress(quiet: bool) -> bool:
    try:
        return not quiet and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt_nbytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} bytes ({n / size:.2f} {unit})"
    return f"{n} bytes"


# --------------------------------------------------------------------------- commands


def cmd_convert(args: dict) -> int:
    from .convert import convert

    framework = "diffusers" if args["--use-diffusers"] else "transformers" if args["--use-transformers"] else None
    r = convert(args["<src>"], args["<dst>"], subfolder=args["--subfolder"], variant=args["--variant"],
                dtype=args["--dtype"], framework=framework, force=args["--force"],
                progress=_progress(args["--quiet"]), ignore=_ignore_from_args(args),
                max_shard_size=args.get("--max-shard-size"))
    for note in r.notes:
        _print(f"flashpack: note: {note}", file=sys.stderr)
    gibps = r.payload_nbytes / max(r.seconds, 1e-9) / (1 << 30)
    _print(f"{r.dst}: {r.tensors} tensors, {r.aliases} aliases, {_fmt_nbytes(r.file_nbytes)} "
          f"from {len(r.source.files)} file(s) of {r.source.description} in {r.seconds:.3f} s ({gibps:.2f} GiB/s)")
    return EXIT_OK


def _ignore_from_args(args: dict):
    """fal's ``--ignore-names/--ignore-prefixes/--ignore-suffixes`` as a predicate, or ``None`` without them."""
    from ..deserialization import ignore_filter

    names, prefixes, suffixes = (args.get(f"--ignore-{k}") or [] for k in ("names", "prefixes", "suffixes"))
    return ignore_filter(names, prefixes, suffixes) if (names or prefixes or suffixes) else None


def fal_fields(wm, *, show_index: bool) -> dict:
    """fal's ``metadata --json`` fields (``flashpack.deserialization.fal_metadata``; fal's footer as stored for
    fal's files); ``index`` only with ``show_index``, as fal prints it."""
    from ..deserialization import fal_metadata, get_flashpack_file_metadata

    doc = get_flashpack_file_metadata(wm.path) if wm.source.startswith("fal-") else fal_metadata(wm)
    if not show_index:
        doc.pop("index", None)
    return doc


def metadata_dict(wm) -> dict:
    """The weight map as plain JSON-ready data (what ``flashpack metadata --json`` prints)."""
    return {
        "path": wm.path,
        "source": wm.source,
        "format_version": wm.version,
        "byte_order": wm.byte_order,
        "file_nbytes": wm.file_nbytes,
        "tensors": len(wm.tensors),
        "aliases": dict(wm.aliases),
        "payload_nbytes": wm.payload_nbytes,
        "checksum": None if wm.checksum_algorithm is None else
        {"algorithm": wm.checksum_algorithm, "chunk_nbytes": wm.chunk_nbytes},
        "blocks": [{"dtype": b.dtype, "offset": b.offset, "end": b.offset + b.nbytes, "nbytes": b.nbytes,
                    "chunks": 0 if b.checksums is None else len(b.checksums)} for b in wm.blocks],
        "metadata": dict(wm.metadata),
    }


def cmd_metadata(args: dict) -> int:
    from ..deserialization import read_weight_map

    wm = read_weight_map(args["<path>"])
    doc = metadata_dict(wm)
    index = [{"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
             for t in wm.tensors.values()]
    if args["--json"]:
        schema = args.get("--format") or "flashpack"
        if schema not in ("flashpack", "fal"):
            raise ValueError(f"--format={schema}: metadata --json takes --format=flashpack or --format=fal")
        fal = fal_fields(wm, show_index=args["--show-index"])
        if schema == "fal":
            print(safe_json(fal))
            return EXIT_OK
        if args["--show-index"]:
            for mine, theirs in zip(index, fal.pop("index")):
                mine.update(name=theirs["name"], length=theirs["length"], macroblock=theirs.get("macroblock", 0),
                            offset_elems=theirs["offset"])
            doc["index"] = index
        for k, v in fal.items():
            doc.setdefault(k, v)
        print(safe_json(doc))
        return EXIT_OK
    if args.get("--format"):
        raise ValueError(f"--format={args['--format']}: metadata takes --format only with --json")
    ck = doc["checksum"]
    lines = [
        f"file:         {wm.path}",
        f"format:       {wm.source}" + (f" version {wm.version}" if wm.source == "flashpack" else ""),
        f"byte order:   {wm.byte_order}",
        f"file size:    {_fmt_nbytes(wm.file_nbytes)}",
        f"tensors:      {len(wm.tensors)} stored, {len(wm.aliases)} aliases",
        f"payload:      {_fmt_nbytes(wm.payload_nbytes)}",
        "checksum:     " + ("none" if ck is None else f"{ck['algorithm']}, {ck['chunk_nbytes']}-byte chunks"),
        f"blocks:       {len(wm.blocks)}",
    ]
    for i, b in enumerate(doc["blocks"]):
        lines.append(f"  [{i}] {b['dtype']:<8} bytes [{b['offset']}, {b['end']})  {b['nbytes']} bytes, {b['chunks']} chunk(s)")
    if wm.aliases:
        lines.append("aliases:")
        lines += [f"  {a} -> {t}" for a, t in wm.aliases.items()]
    lines.append(f"metadata:     {len(wm.metadata)} entries")
    lines += [f"  {k}: {v}" for k, v in wm.metadata.items()]
    if args["--show-index"]:
        lines.append("index:        key  dtype  shape  offset  nbytes")
        lines += [f"  {t['key']}  {t['dtype']}  {tuple(t['shape'])}  {t['offset']}  {t['nbytes']}" for t in index]
    _print(*lines)
    return EXIT_OK


def cmd_revert(args: dict) -> int:
    from .revert import revert

    fmt = args.get("--format")
    if fmt not in (None, "safetensors", "torch", "fal"):
        raise ValueError(f"--format={fmt}: revert writes --format=safetensors, torch or fal")
    r = revert(args["<path>"], args["<dst>"], force=args["--force"], progress=_progress(args["--quiet"]), format=fmt,
               one_file=bool(args.get("--one-file")))
    for note in r.notes:
        _print(f"flashpack: note: {note}", file=sys.stderr)
    _print(f"{r.dst}: {r.format}, {r.tensors} tensors, {r.aliases} aliases (written as copies), "
          f"{_fmt_nbytes(r.file_nbytes)} in {r.seconds:.2f} s")
    return EXIT_OK


def cmd_verify(args: dict) -> int:
    from ..deserialization import verify

    r = verify(args["<path>"])
    _print(f"{r.path}: header, weight map and layout OK ({r.source}; {r.tensors} tensors, {r.aliases} aliases, "
          f"{r.blocks} blocks, {_fmt_nbytes(r.file_nbytes)})")
    if r.checksum_algorithm is None:
        _print(f"{r.path}: no checksums in this file (fal flashpack format): payload bytes not verified")
    else:
        _print(f"{r.path}: {r.chunks_verified} {r.checksum_algorithm} chunk checksums OK "
              f"({_fmt_nbytes(r.bytes_verified)} verified)")
    _print(f"{r.path}: sound")
    return EXIT_OK


COMMANDS = {"convert": cmd_convert, "metadata": cmd_metadata, "revert": cmd_revert, "verify": cmd_verify}


# --------------------------------------------------------------------------- errors -> exit status


def exit_status(e: BaseException) -> int:
    """2 for unusable input (not a flashpack file, missing path, bad argument), 1 for a damaged or
    failed file (a broken invariant, a checksum, a failed read or write)."""
    from ..errors import FlashPackError, FormatError, NotAFlashPackError, NotARegularFileError

    if isinstance(e, (NotAFlashPackError, NotARegularFileError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return EXIT_USAGE
    if isinstance(e, FormatError):
        return EXIT_DAMAGED
    if isinstance(e, OSError):
        return EXIT_DAMAGED
    if isinstance(e, FlashPackError):  # UsageError and the rest: the input cannot be used
        return EXIT_DAMAGED if type(e).__name__ == "ReadError" else EXIT_USAGE
    if isinstance(e, (ValueError, TypeError, KeyError)):
        return EXIT_USAGE
    return EXIT_DAMAGED


def _one_line(e: BaseException) -> str:
    from ..errors import WriteError

    if isinstance(e, WriteError):  # its message names the destination already
        return " ".join(str(e.strerror).split())
    if isinstance(e, OSError) and e.filename is not None and not str(e).startswith(str(e.filename)):
        what = {FileNotFoundError: "no such file or folder", IsADirectoryError: "is a folder, not a file",
                NotADirectoryError: "a part of the path is not a folder",
                PermissionError: "permission denied"}.get(type(e), e.strerror or str(e))
        fix = {FileNotFoundError: "check the path", PermissionError: "check the file's permissions"}.get(
            type(e), "check the file and the disk")
        return f"{e.filename}: {what}; {fix}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


#: per command: option -> whether it takes a value (the usage above, fal's short flags included)
_OPTIONS = {
    "convert": {"--subfolder": True, "--variant": True, "--dtype": True, "--ignore-names": True,
                "--ignore-prefixes": True, "--ignore-suffixes": True, "--max-shard-size": True, "--use-diffusers": False,
                "--use-transformers": False, "--force": False, "--quiet": False, "--verbose": False, "-v": False},
    "metadata": {"--show-index": False, "-i": False, "--json": False, "-j": False, "--format": True},
    "revert": {"--format": True, "--one-file": False, "--force": False, "--quiet": False, "--verbose": False, "-v": False},
    "verify": {},
}


def bad_argument(cmd: str | None, args: list[str]) -> str:
    """What is wrong with a command line docopt refused, naming the flag: an unknown option, a value missing
    or given to a flag that takes none, or a wrong number of paths."""
    if cmd is None:
        return "bad arguments"
    known = _OPTIONS[cmd]
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and a != "-":
            name, eq, _ = a.partition("=")
            if name not in known:
                return f"unknown option {name!r} for `flashpack {cmd}`"
            if known[name] and not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    return f"option {name} needs a value ({name}=<value>)"
                i += 1
            elif not known[name] and eq:
                return f"option {name} takes no value"
        i += 1
    if "--use-diffusers" in args and "--use-transformers" in args:
        return "options --use-diffusers and --use-transformers exclude each other"
    return "wrong number of paths or a repeated option"


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (``flashpack metadata ... | head``): point stdout at /dev/null so the
    interpreter's final flush cannot fail again, and exit 0 without a message, as ``head`` expects."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 damaged or failed file, 2 usage error)."""
    from docopt import DocoptExit, docopt

    from .. import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS and any(a in ("-h", "--help") for a in argv[1:]):
        print(COMMAND_HELP[argv[0]], end="")
        return EXIT_OK
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return EXIT_OK
    if argv == ["--version"]:
        print(f"flashpack {__version__}")
        return EXIT_OK
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"flashpack: error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)} "
              f"(see `flashpack --help`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # docopt-ng warns on stderr before raising
            args = docopt(__doc__, argv, default_help=False)
    except DocoptExit as e:
        cmd = argv[0] if argv and argv[0] in COMMANDS else None
        usage = COMMAND_HELP[cmd].split("\n\n", 1)[0] if cmd else str(e).strip() or "usage: flashpack --help"
        print(f"{usage}\nflashpack: error: {bad_argument(cmd, argv[1:] if cmd else argv)}; "
              f"see `flashpack {cmd + ' ' if cmd else ''}--help`", file=sys.stderr)
        return EXIT_USAGE
    cmd = next((c for c in COMMANDS if args.get(c)), None)
    if cmd is None:
        print(__doc__.strip(), file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[cmd](args)
    except BrokenPipeError:
        return quiet_broken_pipe()
    except KeyboardInterrupt:
        print("flashpack: interrupted; nothing was written over", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit status
        if _debug():
            traceback.print_exc()
        _print(f"flashpack {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return exit_status(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
