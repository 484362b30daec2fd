"""Dataset file tools, as XTuner ships them next to training (`xtune data repeat`)."""

import json
import os
from pathlib import Path

from xtune.data.sources import too_deep
from xtune.errors import DataError
from xtune.paths import write_failure

OUTPUT_SUFFIXES = (".json", ".jsonl")


def repeat_dataset(input_path: str | os.PathLike, output_path: str | os.PathLike, n: int) -> int:
    """Writes the records of `input_path` (a JSON array, or JSON Lines) `n` times over to `output_path`.

    The output is a JSON array for .json and JSON Lines for .jsonl; an existing output is never
    replaced. Returns the number of records written. Repeating a small dataset is how XTuner's LLaVA
    recipes oversample it, e.g. a handful of examples seen 200 times an epoch.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"the repeat count must be a whole number >= 1, got {n!r}.")
    if output_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"{output_path}: the output must end in .json (a JSON array) or .jsonl (JSON Lines).")
    if output_path.exists():
        raise DataError(f"{output_path} already exists; remove it or choose another output path.")
    records = read_json_records(input_path)
    if not records:
        raise DataError(f"{input_path} holds no records; there is nothing to repeat.")
    repeated = records * n
    try:
        if output_path.suffix.lower() == ".jsonl":
            text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in repeated)
        else:
            text = json.dumps(repeated, ensure_ascii=False, indent=2) + "\n"
    except RecursionError:  # read at the parser's limit, one level more to write
        raise DataError(f"{input_path}: a record is nested too deep to be written again as JSON.") from None
    partial = output_path.with_name(f".{output_path.name}.{os.getpid()}.partial")
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, output_path)
    except OSError as error:
        raise DataError(
            f"could not write {output_path}: {write_failure(error)}; {input_path} is as it was, and no partial "
            "output is left."
        ) from error
    finally:
        partial.unlink(missing_ok=True)
    return len(repeated)


def read_json_records(path: Path) -> list:
    """The records of a .json file holding a list, or of a JSON Lines file (.jsonl, or .json with one record a line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist (looked at {path.resolve()}).") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text.") from error
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error}).") from error
    if path.suffix.lower() != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                message = f"not valid JSON ({error.msg} at column {error.colno})"
                raise DataError(f"{path}:{error.lineno}: {message}.") from error
        except RecursionError:
            line, message = too_deep(text)
            raise DataError(f"{path}:{line}: {message}.") from None
        except ValueError as error:  # e.g. an integer of over 4,300 digits
            raise DataError(f"{path}: not valid JSON ({error}).") from None
        else:
            if not isinstance(records, list):
                raise DataError(
                    f"{path} holds a JSON {type(records).__name__}, not a list of records; "
                    "a .json dataset must be a JSON array (or one record a line)."
                )
            return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}).") from error
        except RecursionError:
            raise DataError(f"{path}:{number}: {too_deep(line)[1]}.") from None
        except ValueError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error}).") from None
    return records
