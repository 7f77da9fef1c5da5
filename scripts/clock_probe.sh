#!/usr/bin/env bash
# Runs a command while nvidia-smi samples the GPU every 50 ms, then summarises the SM clock, power
# and clock-event reasons seen while it ran (GPU 0). For reading a benchmark's numbers: the
# compute rows run at the board's power limit, where the SM clock, not the kernel's cycle count
# alone, sets the time (docs/performance.md, "The power limit").
#
#     bash scripts/clock_probe.sh LOG -- COMMAND [ARGS...]
# e.g. bash scripts/clock_probe.sh $OUT/c1.smi -- build/cppbench/bench_base --cases c1 --reps 2000
#
# LOG gets the raw samples (csv); the summary goes to stdout after the command's own output,
# with the board energy the command took (NVML's counter before and after it, process setup
# included: difference two run lengths for an energy per call, the figure that sets the time of
# a power-capped run).
# Reasons (bit mask): 0x1 idle, 0x4 software power cap, 0x20 software thermal slowdown,
# 0x40 hardware thermal slowdown, 0x80 hardware power brake.
set -u
log=$1; shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: $0 LOG -- COMMAND [ARGS...]" >&2; exit 2; }
command -v nvidia-smi > /dev/null || { echo "clock_probe: no nvidia-smi" >&2; exit 2; }

# Board energy counter of GPU 0 in mJ (NVML through ctypes: nvidia-smi has no field for it).
energy_mj() {
    python3 - << 'PY' 2> /dev/null || echo "?"
import ctypes
nvml = ctypes.CDLL("libnvidia-ml.so.1")
handle, mj = ctypes.c_void_p(), ctypes.c_ulonglong()
ok = nvml.nvmlInit_v2() == 0 and nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 0
print(mj.value if ok and nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj)) == 0 else "?")
PY
}
nvidia-smi -i 0 --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 50 > "$log" 2>&1 &
smi=$!
sleep 0.2
e0=$(energy_mj)
"$@"
rc=$?
e1=$(energy_mj)
sleep 0.1
kill "$smi" 2> /dev/null
wait "$smi" 2> /dev/null
export CLOCK_PROBE_ENERGY_MJ="$e0 $e1"

# Samples while the GPU was busy (clock-event reason "idle" not set; nvidia-smi's power reading
# is a running average that lags a short run, so it does not decide this).
python3 - "$log" <<'PY'
import os, statistics, sys
try:
    e0, e1 = (float(x) for x in os.environ.get("CLOCK_PROBE_ENERGY_MJ", "").split())
    energy = f"{(e1 - e0) / 1e3:.1f}"
except ValueError:
    energy = "?"
rows = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    try:
        rows.append((int(f[1]), float(f[2]), int(f[3]), int(f[4], 16)))
    except (IndexError, ValueError):
        pass
busy = [r for r in rows if not (r[3] & 0x1)]
if not busy:
    print(f"clock_probe: {len(rows)} samples, none busy, energy {energy} J")
    sys.exit(0)
clk = [r[0] for r in busy]; pw = [r[1] for r in busy]
capped = sum(1 for r in busy if r[3] & 0x4)
print(f"clock_probe: {len(busy)} busy samples of {len(rows)}: SM clock median {statistics.median(clk):.0f} MHz "
      f"(min {min(clk)}, max {max(clk)}), power median {statistics.median(pw):.0f} W (max {max(pw):.0f}), "
      f"power-capped in {100 * capped / len(busy):.0f}% of them, temperature max {max(r[2] for r in busy)} C, "
      f"energy {energy} J")
PY
exit $rc
