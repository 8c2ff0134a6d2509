"""`gpujobs data push PATH`: store a dataset once, by content, and print its URI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import typer

from gpujobs.settings import load_settings

data_app = typer.Typer(no_args_is_help=True, help="Store datasets that jobs fetch by URI.")


@data_app.command("push")
def push(
    path: Path = typer.Argument(..., help="A file or folder to store."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Upload PATH once, addressed by its SHA-256; print the URI for GPUJOBS_DATASET_URI."""
    from gpujobs.datasets import push_dataset

    result = asyncio.run(push_dataset(load_settings().artifact_root, path))
    if json_output:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    typer.echo(result.uri)
    summary = (
        f"uploaded {_files(result.uploaded_files)} ({result.size_bytes} bytes)"
        if result.uploaded_files
        else "already stored; nothing uploaded"
    )
    typer.echo(f"{_files(result.file_count)}, {summary}", err=True)


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"
