"""Debug: which ping-pong launches of fp8_row_gemm_sm90 fail (each in a child process with a time limit).

python3 reports/fp8_matmul/debug_row_pingpong.py
"""

import json
import subprocess
import sys

CHILD = """
import json, sys, torch
from flux2_bench.kernels import fp8_row_gemm_sm90 as R
from flux2_bench.kernels.fp8_matmul import fp8_gemm_ref
M, N, K, kw = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
a = (torch.randn(M, K, generator=g) * 2).to(torch.float8_e4m3fn).cuda()
b = (torch.randn(N, K, generator=g) * 2).to(torch.float8_e4m3fn).cuda()
sa, sb = (torch.rand(M, 1, generator=g) + 0.5).cuda(), (torch.rand(1, N, generator=g) + 0.5).cuda()
out = R.fp8_row_gemm_sm90(a, b, sa, sb, **kw)
torch.cuda.synchronize()
ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32)
print("rel_l2", ((out.float() - ref).norm() / ref.norm()).item())
"""

PP = dict(pingpong=True, block_n=128)
CASES = [
    (2048, 1536, 2048, dict(PP, num_stages=5)),
    (2048, 1536, 2048, dict(PP, num_stages=2)),
    (2048, 1536, 128, dict(PP, num_stages=5)),
    (128, 128 * 133, 256, dict(PP, num_stages=5)),  # 133 tiles: program 0 alone has two
    (2048, 1536, 2048, dict(block_n=128, num_stages=6)),
]


def main():
    sanitize = "--sanitize" in sys.argv
    for M, N, K, kw in CASES:
        argv = [sys.executable, "-c", CHILD, json.dumps([M, N, K, kw])]
        if sanitize:
            argv = ["/usr/local/cuda/bin/compute-sanitizer", "--tool", "memcheck", "--print-limit", "5"] + argv
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            tail = (r.stdout + r.stderr)[-1800:] if r.returncode or sanitize else r.stdout.strip()
            print(json.dumps({"case": [M, N, K, kw], "rc": r.returncode, "out": tail}), flush=True)
        except subprocess.TimeoutExpired:
            print(json.dumps({"case": [M, N, K, kw], "rc": "timeout"}), flush=True)
        if sanitize:
            break


if __name__ == "__main__":
    main()
