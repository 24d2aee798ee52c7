"""Write tests/data/stories260K-q8_0.gguf: the checked-in stories260K with its matrices quantized to Q8_0.

``make install`` decodes one batch of this file to prove that the llama.cpp it built runs on this CPU
(``gatenorm_edge.buildcheck``): Q8_0 matrix products are where an AMX build of llama.cpp faults on a
virtual machine that lists AMX but does not run it, while the F32 original never reaches that code.
Every 2-D tensor whose rows split into Q8_0 blocks of 32 is quantized (all but ``ffn_down``, whose rows
of 172 do not); the metadata is copied unchanged. Written with the upstream ``gguf`` package.

    python tools/make_probe_model.py [SOURCE] [DEST]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
Q8_0_BLOCK = 32


def copy_fields(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Every key-value pair of ``reader`` except the ones the writer makes itself."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DATA / "stories260K.gguf")
    parser.add_argument("dest", nargs="?", type=Path, default=DATA / "stories260K-q8_0.gguf")
    args = parser.parse_args()
    reader = GGUFReader(args.source)
    architecture = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(args.dest, architecture)
    copy_fields(reader, writer)
    for tensor in reader.tensors:
        values = np.asarray(tensor.data)
        if values.ndim == 2 and values.shape[1] % Q8_0_BLOCK == 0:
            writer.add_tensor(tensor.name, quantize(values.astype(np.float32), GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
