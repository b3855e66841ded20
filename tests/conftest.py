import os
import pathlib

import pytest

DATA_DIR = pathlib.Path(os.environ.get("SLAROUTER_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not (DATA_DIR / "llama3-zoo" / "meta.json").exists():
        pytest.skip(f"shared datasets not found under {DATA_DIR} (set SLAROUTER_DATA)")
    return DATA_DIR
