"""Conversion of a synthetic model with more than 2 GB of external weights: wall time and peak RSS.

python benchmarks/large_model.py [--gb 2.2] [--keep DIR]. The model (a stride-2 conv stem, then
1x1 convs with large weights, then a strided conv) is generated with its weights in one external
file; each step runs in a fresh process: writing the model, then `aa-deploy convert` on it.
Peak RSS is VmHWM (ru_maxrss would carry over from the parent).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = r"""
import sys, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
path, gb = sys.argv[1], float(sys.argv[2])
c = 4096                                  # 1x1 conv 4096 -> 4096: 64 MiB of float32 each
n = max(1, int(gb * 2**30 // (c * c * 4)) + 1)
rng = np.random.default_rng(0)
nodes, inits = [], []
w0 = numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3), dtype=np.float32) * 0.01, "stem.w")
inits.append(w0)
nodes.append(helper.make_node("Conv", ["x", "stem.w"], ["t0"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem"))
for i in range(n):
    w = rng.standard_normal((c, c, 1, 1), dtype=np.float32) * np.float32(1.0 / np.sqrt(c))  # keeps the scale
    inits.append(numpy_helper.from_array(w, f"block{i}.w"))
    nodes.append(helper.make_node("Conv", [f"t{i}", f"block{i}.w"], [f"t{i + 1}"], name=f"block{i}"))
inits.append(numpy_helper.from_array(rng.standard_normal((8, c, 3, 3), dtype=np.float32) * 0.01, "head.w"))
nodes.append(helper.make_node("Conv", [f"t{n}", "head.w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], name="head"))
graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="big.onnx.data")
"""

CONVERT = r"""
import sys, time
t = time.perf_counter()
from aa_deploy.cli import main
code = main(["convert", sys.argv[1], "-o", sys.argv[2], "-q"])
hwm = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(code, time.perf_counter() - t, hwm)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gb", type=float, default=2.2)
    p.add_argument("--keep", help="keep the files in this folder")
    args = p.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="aa-big-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        src, out = folder / "big.onnx", folder / "big.aa.onnx"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE, str(src), str(args.gb)], check=True)
        make_s = time.perf_counter() - t
        data = (folder / "big.onnx.data").stat().st_size
        # The floor: copying the weights once, as any conversion that writes a new file must.
        t = time.perf_counter()
        shutil.copyfile(folder / "big.onnx.data", folder / "copy.data")
        copy_s = time.perf_counter() - t
        (folder / "copy.data").unlink()
        proc = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out)], capture_output=True, text=True)
        code, convert_s, hwm_kb = proc.stdout.split()[-3:]
        print(f"weights {data / 2**30:.2f} GiB (generated in {make_s:.1f} s); copying them once takes {copy_s:.1f} s")
        print(
            f"convert: exit {code}, {float(convert_s):.1f} s wall, {float(convert_s) - copy_s:+.1f} s beyond the copy, "
            f"peak RSS {int(hwm_kb) / 1024:.0f} MB"
        )
        if proc.returncode or code != "0":
            print(proc.stderr[-2000:])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
