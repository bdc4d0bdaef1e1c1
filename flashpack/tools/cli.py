"""flashpack: convert checkpoints to .flashpack files, inspect, revert and verify them.

Usage:
  flashpack convert <src> [<dst>] [--subfolder=<name>] [--variant=<v>] [--dtype=<dtype>] [--use-diffusers | --use-transformers] [--max-shard-size=<size>] [--force] [--quiet]
  flashpack metadata <path> [--show-index] [--json]
  flashpack revert <path> [<dst>] [--one-file] [--force] [--quiet]
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
  --force             Replace an existing destination.
  --quiet             No progress bar.
  --show-index        One line per tensor: key, dtype, shape, offset, nbytes.
  --json              The same as JSON on stdout.
  -h --help           Show this text.
  --version           Show the version.

Exit status: 0 success, 1 a damaged or failed file, 2 a usage error or unusable input.
Set FLASHPACK_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback

COMMAND_HELP = {
    "convert": """Usage: flashpack convert <src> [<dst>] [--subfolder=<name>] [--variant=<v>] [--dtype=<dtype>]
                         [--use-diffusers | --use-transformers] [--max-shard-size=<size>] [--force] [--quiet]

Convert a checkpoint into one .flashpack file, streaming one source file at a time.

  <src>   a .safetensors file; a .pt/.bin/.pth file (torch.load(weights_only=True)); a folder of
          shards with its *.index.json; a transformers or diffusers model folder; or a Hub repo id
          org/name (only the needed files are downloaded). A path starting with ., / or ~ is never
          looked up on the Hub.
  <dst>   default: next to the source (model.safetensors -> model.flashpack; a folder ->
          <folder>/model[.<variant>].flashpack; a Hub repo -> ./<name>[-<subfolder>][.<variant>].flashpack).
          Never the source; an existing file only with --force; written atomically.

Options:
  --subfolder=<name>  Folder inside the model folder or repo.
  --variant=<v>       Only the variant's files (model.fp16-00001-of-00002.safetensors or
                      model-00001-of-00002.fp16.safetensors); without it, the default set.
  --dtype=<dtype>     Cast floating-point tensors only (float16, bfloat16, float32...).
  --use-diffusers     Look for diffusion_pytorch_model.* files.
  --use-transformers  Look for model.* / pytorch_model.* files and restore tied weights from config.json.
  --max-shard-size=<size>  Write a sharded pack: NAME-00001-of-0000N.flashpack ... + <dst>.index.json, at most
                      <size> tensor bytes per shard (20GB = 20*10^9, 5GiB, or keep: about the source's shards).
  --force             Replace an existing destination.
  --quiet             No progress bar (also off when stderr is not a terminal).
""",
    "metadata": """Usage: flashpack metadata <path> [--show-index] [--json]

Print the format version, byte order, dtype blocks with byte ranges, tensor count, total bytes,
aliases, user metadata and checksum kind of a .flashpack file (or a fal flashpack file). Reads only
the header and the weight map, whatever the file size.

Options:
  --show-index  One line per tensor: key, dtype, shape, offset, nbytes.
  --json        The same as JSON on stdout.
""",
    "revert": """Usage: flashpack revert <path> [<dst>] [--one-file] [--force] [--quiet]

Write the tensors of a .flashpack file as .safetensors (default) or .pt (<dst> ending in .pt, .pth
or .bin), exactly: dtypes, shapes, user metadata (as safetensors metadata). Aliases are written as
copies and recorded in the metadata (metadata[alias] = target, as safetensors.torch.save_model does).
Default <dst>: the source name with .safetensors (model.flashpack -> model.safetensors). Never the
source; an existing file only with --force; written atomically.

Options:
  --one-file  A sharded pack (its .flashpack.index.json or folder) as one file; without it, as sharded
              safetensors (NAME-00001-of-0000N.safetensors + NAME.safetensors.index.json).
  --force  Replace an existing destination.
  --quiet  No progress bar (also off when stderr is not a terminal).
""",
    "verify": """Usage: flashpack verify <path>

Check every invariant of a .flashpack file (header, weight map, layout) and every payload checksum,
and print what was checked. Exit status 0 when the file is sound, 1 when it is damaged (the message
names the first bad block, chunk or key), 2 when it is not a flashpack file.
""",
}

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE = 0, 1, 2


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
                progress=_progress(args["--quiet"]), max_shard_size=args.get("--max-shard-size"))
    for note in r.notes:
        print(f"flashpack: note: {note}", file=sys.stderr)
    gibps = r.payload_nbytes / max(r.seconds, 1e-9) / (1 << 30)
    print(f"{r.dst}: {r.tensors} tensors, {r.aliases} aliases, {_fmt_nbytes(r.file_nbytes)} "
          f"from {len(r.source.files)} file(s) of {r.source.description} in {r.seconds:.3f} s ({gibps:.2f} GiB/s)")
    return EXIT_OK


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
        if args["--show-index"]:
            doc["index"] = index
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return EXIT_OK
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
    print("\n".join(lines))
    return EXIT_OK


def cmd_revert(args: dict) -> int:
    from .revert import revert

    r = revert(args["<path>"], args["<dst>"], force=args["--force"], progress=_progress(args["--quiet"]),
               one_file=bool(args.get("--one-file")))
    for note in r.notes:
        print(f"flashpack: note: {note}", file=sys.stderr)
    print(f"{r.dst}: {r.format}, {r.tensors} tensors, {r.aliases} aliases (written as copies), "
          f"{_fmt_nbytes(r.file_nbytes)} in {r.seconds:.2f} s")
    return EXIT_OK


def cmd_verify(args: dict) -> int:
    from ..deserialization import verify

    r = verify(args["<path>"])
    print(f"{r.path}: header, weight map and layout OK ({r.source}; {r.tensors} tensors, {r.aliases} aliases, "
          f"{r.blocks} blocks, {_fmt_nbytes(r.file_nbytes)})")
    if r.checksum_algorithm is None:
        print(f"{r.path}: no checksums in this file (fal flashpack format): payload bytes not verified")
    else:
        print(f"{r.path}: {r.chunks_verified} {r.checksum_algorithm} chunk checksums OK "
              f"({_fmt_nbytes(r.bytes_verified)} verified)")
    print(f"{r.path}: sound")
    return EXIT_OK


COMMANDS = {"convert": cmd_convert, "metadata": cmd_metadata, "revert": cmd_revert, "verify": cmd_verify}


# --------------------------------------------------------------------------- errors -> exit status


def exit_status(e: BaseException) -> int:
    """2 for unusable input (not a flashpack file, missing path, bad argument), 1 for a damaged or
    failed file (a broken invariant, a checksum, a failed read or write)."""
    from ..errors import FlashPackError, FormatError, NotAFlashPackError

    if isinstance(e, (NotAFlashPackError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
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
    if isinstance(e, OSError) and e.filename is not None and not str(e).startswith(str(e.filename)):
        what = {FileNotFoundError: "no such file or folder", IsADirectoryError: "is a folder, not a file",
                NotADirectoryError: "a part of the path is not a folder",
                PermissionError: "permission denied"}.get(type(e), e.strerror or str(e))
        fix = {FileNotFoundError: "check the path", PermissionError: "check the file's permissions"}.get(
            type(e), "check the file and the disk")
        return f"{e.filename}: {what}; {fix}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


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
        print(f"{usage}\nflashpack: error: bad arguments; see `flashpack {cmd + ' ' if cmd else ''}--help`",
              file=sys.stderr)
        return EXIT_USAGE
    cmd = next((c for c in COMMANDS if args.get(c)), None)
    if cmd is None:
        print(__doc__.strip(), file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[cmd](args)
    except KeyboardInterrupt:
        print("flashpack: interrupted; nothing was written over", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit status
        if _debug():
            traceback.print_exc()
        print(f"flashpack {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return exit_status(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
