"""Markdown tables shaped like the adaptive-DDNN paper's Tables II-IV and PNG plots, from the JSON that
ddnn_gen.bench.system produces (so they can be re-rendered without re-running anything)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(us: float | None) -> str:
    return "n/a" if us is None else f"{us / 1000:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _config_name(run: dict[str, Any]) -> str:
    if run["configuration"] == "Server-only":
        return "Server-only"
    mark = " (calibrated)" if run.get("calibrated") else ""
    return f"Device&Server t={run['threshold']:.4g}{mark}"


def table_ii(result: dict[str, Any]) -> str:
    lines = ["| model | configuration | T_Device mean / p50 / p99 | T_Server mean / p50 / p99 (offloaded) | "
             "T_Comm mean / p50 / p99 (offloaded) | T_Total mean / p50 / p99 | mean per sample: Device + Server + "
             "Comm = Total |",
             "|---|---|---|---|---|---|---|"]
    for model in result["models"]:
        for run in model["runs"]:
            times, per = run["times_us"], run["mean_per_sample_us"]
            cells = [" / ".join(_ms(times[key][q]) for q in ("mean", "p50", "p99"))
                     for key in ("device", "server", "comm", "total")]
            lines.append(f"| {model['name']} | {_config_name(run)} | {' | '.join(cells)} | "
                         f"{_ms(per['device'])} + {_ms(per['server'])} + {_ms(per['comm'])} = {_ms(per['total'])} |")
    return "Table II: time decomposition (ms)\n\n" + "\n".join(lines)


def table_iii(result: dict[str, Any]) -> str:
    hz = result["config"]["per_device_hz"]
    lines = [f"| model | configuration | Local | Server | Overall | Ideal | local exit | server exit | fallback | "
             f"payload B/sample (req+reply) | MQTT B/sample | Python Overall | devices/server @ {hz:g} Hz |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in result["models"]:
        for run in model["runs"]:
            acc, rates, wire = run["accuracy"], run["exit_rates"], run["wire"]
            devices = run.get("devices_supported")
            lines.append(
                f"| {model['name']} | {_config_name(run)} | {_pct(acc['local'])} | {_pct(acc['server'])} | "
                f"{_pct(acc['overall'])} | {_pct(acc['ideal'])} | {_pct(rates['local'])} | {_pct(rates['server'])} | "
                f"{_pct(rates['fallback'])} | {wire['payload_bytes_per_sample']:.1f} | "
                f"{wire['mqtt_publish_bytes_per_sample']:.1f} | {_pct(run['expected']['overall_accuracy'])} | "
                f"{'n/a' if devices is None else f'{devices:,.0f}'} |")
    return "Table III: accuracy and exit rates per threshold\n\n" + "\n".join(lines)


def table_iv(result: dict[str, Any]) -> str:
    bound = result["config"]["p99_bound_ms"]
    lines = [f"| workload | models loaded (random copies) | idle RSS MiB | peak RSS MiB | sustained req/s (p99 <= "
             f"{bound:g} ms) | p99 at that rate ms | server CPU at that rate (1.0 = one core) | first failing step |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(f"W{index + 1}", load) for index, load in enumerate(result["workloads"])]
    rows += [("W1, one BLAS thread per core (server default: 1)", load)
             for load in result.get("workloads_multi_blas", [])]
    for name, load in rows:
        # The last failing step after the sustained one (a failed step is tried twice).
        failing = next((step for step in reversed(load["steps"]) if not step["ok"]), None)
        fail = "none (top of the list)" if failing is None else (
            f"{failing['offered_rate']:g}/s: p99 {failing['rtt_ms']['p99'] or float('nan'):.1f} ms, "
            f"lost {failing['lost']}, achieved {failing['achieved_rate']:.0f}/s")
        p99 = load["sustained_p99_ms"]
        cpu = load["cpu_utilisation_at_sustained"]
        lines.append(f"| {name} | {load['models']} ({load['random_copies']}) | "
                     f"{load['idle_rss_bytes'] / 2**20:.1f} | {load['peak_rss_bytes'] / 2**20:.1f} | "
                     f"{load['sustained_rate']:g} | {'n/a' if p99 is None else f'{p99:.1f}'} | "
                     f"{'n/a' if cpu is None else f'{cpu:.2f}'} | {fail} |")
    note = ("Steps of the offered rate last " f"{result['config']['step_s']:g} s each (open loop, Python simulated "
            "devices on the same machine); a failing step is tried twice.")
    return "Table IV: server load per workload\n\n" + "\n".join(lines) + "\n\n" + note


def encoding_table(result: dict[str, Any]) -> str:
    lines = ["| model | split values | dense bits payload B | request B (header + bits) | bound ceil(bits/8) + "
             "header | as 64-bit words B (packing 1) | as float32 B | as text B (paper's encoding) | text / bits | "
             "raw input B | raw input as text B |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    header = 0
    for model in result["models"]:
        enc = model["encoding"]
        header = enc["request_header_bytes"]
        bound = header + (enc["split_values"] + 7) // 8
        lines.append(f"| {model['name']} | {enc['split_values']} | {enc['split_bits_payload_bytes']} | "
                     f"{enc['split_request_bytes']} | {bound} {'ok' if enc['split_request_bytes'] <= bound else 'OVER'}"
                     f" | {enc['split_words_payload_bytes']} | "
                     f"{enc['split_float32_bytes']} | {enc['split_text_bytes']:.0f} | "
                     f"{enc['split_text_bytes'] / enc['split_bits_payload_bytes']:.1f}x | {enc['raw_input_bytes']} | "
                     f"{enc['raw_input_text_bytes']:.0f} |")
    return (f"Payload of one offloaded sample by encoding (request header {header} B, protocol v3, in the request "
            "column only; reply 56 B not included)\n\n" + "\n".join(lines))


def request_size_table(result: dict[str, Any]) -> str:
    """Issue 18's bound, per sender of every model given (multi-view ones too), from the encoder."""
    lines = ["| model | sender | split H x W x C | bits | request B (dense, sent) | bound ceil(bits/8) + 64 | "
             "within | request B as 64-bit words (packing 1) |", "|---|---|---|---|---|---|---|---|"]
    for row in result.get("request_sizes", []):
        within = "yes" if row["request_bytes"] <= row["bound_bytes"] else "NO"
        lines.append(f"| {row['model']} | {row['sender']} | {' x '.join(str(n) for n in row['split_hwc'])} | "
                     f"{row['split_bits']} | {row['request_bytes']} | {row['bound_bytes']} | {within} | "
                     f"{row['words_request_bytes']} |")
    return "Request bytes per split sent (wire protocol v3, packing 4)\n\n" + "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    head = (f"Measured on {env['cpus']} CPUs ({env['cpu_model']}), load average {env['load_average_start'][0]:.2f} "
            f"at start / {env['load_average_end'][0]:.2f} at end; {result['models'][0]['samples']} test samples per "
            f"model; server workers {result['config']['server_workers']}; wall {result['wall_s']:.0f} s.")
    return "\n\n".join([head, table_ii(result), table_iii(result), encoding_table(result), request_size_table(result),
                       table_iv(result)]) + "\n"


# ---- plots -------------------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(result: dict[str, Any], path: Path) -> None:
    """Stacked mean-per-sample bars (device, server, comm) per configuration, one panel per model."""
    plt = _pyplot()
    models = result["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), dpi=110, squeeze=False)
    colours = {"device": "#4c72b0", "server": "#dd8452", "comm": "#55a868"}
    for axis, model in zip(axes[0], models):
        names = [_config_name(run).replace("Device&Server ", "D&S\n").replace(" (calibrated)", "\n(calibrated)")
                 for run in model["runs"]]
        bottom = [0.0] * len(names)
        for key, label in (("device", "T_Device"), ("server", "T_Server"), ("comm", "T_Comm")):
            values = [run["mean_per_sample_us"][key] / 1000 for run in model["runs"]]
            axis.bar(names, values, bottom=bottom, color=colours[key], label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, run in enumerate(model["runs"]):
            total = run["mean_per_sample_us"]["total"] / 1000
            axis.annotate(f"{total:.2f} ms\n{100 * run['exit_rates']['server']:.0f}% offloaded", (x, total),
                          ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        axis.set_ylim(0, max(bottom + [0.01]) * 1.3)
        axis.set_ylabel("mean time per sample (ms)")
        axis.set_title(f"{model['name']}: time per sample as the device sees it")
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_thresholds(result: dict[str, Any], path: Path) -> None:
    """Per model: accuracy and exit rate vs threshold (Python sweep curves, measured runs as markers), and
    server load vs threshold (requests per device-sample, and devices one server supports)."""
    plt = _pyplot()
    models = result["models"]
    hz = result["config"]["per_device_hz"]
    sustained = result["workloads"][0]["sustained_rate"] if result["workloads"] else None
    figure, axes = plt.subplots(len(models), 2, figsize=(13, 4.6 * len(models)), dpi=110, squeeze=False)
    for row, model in zip(axes, models):
        sweep = model["sweep"]
        ts = [point["threshold"] for point in sweep]
        runs = [run for run in model["runs"] if run["threshold"] is not None]
        axis = row[0]
        axis.plot(ts, [100 * p["overall_accuracy"] for p in sweep], label="Overall accuracy (Python)", linewidth=2)
        axis.plot(ts, [100 * p["ideal_accuracy"] for p in sweep], "--", label="Ideal accuracy")
        axis.plot(ts, [100 * p["local_exit_rate"] for p in sweep], label="Local exit rate (Python)", linewidth=2)
        axis.plot([r["threshold"] for r in runs], [100 * r["accuracy"]["overall"] for r in runs], "o", color="C0",
                  markersize=8, markerfacecolor="none", label="Overall accuracy (measured, C + server)")
        axis.plot([r["threshold"] for r in runs], [100 * r["exit_rates"]["local"] for r in runs], "s", color="C2",
                  markersize=8, markerfacecolor="none", label="Local exit rate (measured)")
        calibrated = model["calibrated_threshold"]
        axis.axvline(calibrated, color="grey", linestyle=":", label=f"calibrated t = {calibrated:.3g}")
        axis.set_xlabel("local-exit threshold t (normalized entropy)")
        axis.set_ylabel("percent of test samples (%)")
        axis.set_title(f"{model['name']} ({model['dataset']}): accuracy and exits vs threshold")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 101)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
        axis = row[1]
        server_rate = [100 * p["server_exit_rate"] for p in sweep]
        axis.plot(ts, server_rate, color="C1", linewidth=2, label="server exit rate (Python)")
        axis.plot([r["threshold"] for r in runs], [100 * r["exit_rates"]["server"] for r in runs], "o", color="C1",
                  markersize=8, markerfacecolor="none", label="server exit rate (measured)")
        axis.set_xlabel("local-exit threshold t (normalized entropy)")
        axis.set_ylabel("samples sent to the server (%)", color="C1")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 101)
        axis.grid(alpha=0.3)
        title = f"{model['name']}: server load vs threshold"
        if sustained:
            twin = axis.twinx()
            points = [(t, sustained / (hz * p["server_exit_rate"])) for t, p in zip(ts, sweep)
                      if p["server_exit_rate"] > 0]
            twin.semilogy([t for t, _ in points], [d for _, d in points], color="C4", linewidth=2,
                          label=f"devices one server supports at {hz:g} sample/s each")
            twin.set_ylabel(f"devices per server ({sustained:g} req/s sustained, {hz:g} Hz/device)", color="C4")
            handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            labels = axis.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
            axis.legend(handles, labels, loc="center right", fontsize=8)
        else:
            axis.legend(loc="upper right", fontsize=8)
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_load(result: dict[str, Any], path: Path) -> None:
    """p99 round trip and server CPU vs offered rate, one line per workload."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    bound = result["config"]["p99_bound_ms"]
    rows = [(f"W{index + 1}: {load['models']} models", load, "o-") for index, load in enumerate(result["workloads"])]
    rows += [(f"W1, BLAS thread per core: {load['models']} models", load, "s--")
             for load in result.get("workloads_multi_blas", [])]
    for label, load, style in rows:
        final = {step["offered_rate"]: step for step in load["steps"]}  # the retry of a failed step counts
        steps = [s for s in final.values() if s["rtt_ms"]["p99"] is not None]
        left.plot([s["offered_rate"] for s in steps], [s["rtt_ms"]["p99"] for s in steps], style, label=label)
        right.plot([s["offered_rate"] for s in steps], [s["server_cpu_utilisation"] for s in steps], style,
                   label=label)
    left.axhline(bound, color="red", linestyle="--", label=f"bound {bound:g} ms")
    left.set_yscale("log")
    left.set_xlabel("offered request rate (requests/s)")
    left.set_ylabel("p99 round trip (ms, log scale)")
    left.set_title("ddnn-server latency under open-loop load")
    right.set_xlabel("offered request rate (requests/s)")
    right.set_ylabel("server process CPU time / wall (1.0 = one core)")
    right.set_title("ddnn-server CPU utilisation")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"tables": out_dir / "bench_system.md", "latency_png": out_dir / "bench_latency.png",
             "thresholds_png": out_dir / "bench_thresholds.png", "load_png": out_dir / "bench_server_load.png"}
    files["tables"].write_text(markdown(result))
    plot_latency(result, files["latency_png"])
    plot_thresholds(result, files["thresholds_png"])
    if result["workloads"]:
        plot_load(result, files["load_png"])
    else:
        del files["load_png"]
    return files
