"""`sorsa inspect`: what a decomposed dir (or a trained adapter) holds, as plain data."""

from __future__ import annotations

from pathlib import Path

from sorsa_tools.errors import NotDecomposedError
from sorsa_tools.format import ADAPTER_FILE, factor_names, read_config, verify_checksums
from sorsa_tools.io.safetensors_file import SafetensorsFile


def describe(directory: str | Path) -> dict:
    """Summarise a SORSA directory; checks that the adapter file matches its config."""
    d = Path(directory)
    cfg = read_config(d, "a decomposed dir (`sorsa decompose`) or a trained run (`sorsa train`)")
    adapter = SafetensorsFile(d / ADAPTER_FILE) if (d / ADAPTER_FILE).exists() else None
    if adapter is None:
        raise NotDecomposedError(f"{d} has {ADAPTER_FILE} missing; re-run the command that made it")
    rank = cfg["rank"]
    missing = [m for m in cfg["target_modules"] for n in factor_names(m) if n not in adapter]
    if missing:
        raise NotDecomposedError(f"{d / ADAPTER_FILE} lacks the factors of {missing[0]}; re-create it")
    verified = verify_checksums(d, cfg, [ADAPTER_FILE])  # inspect is where a user looks for damage
    modules = cfg.get("modules", {})
    energies = [s["energy_captured"] for s in modules.values() if "energy_captured" in s]
    recon = [s["reconstruction_error"] for s in modules.values() if "reconstruction_error" in s]
    s_err = [s["s_max_rel_error"] for s in modules.values() if s.get("s_max_rel_error") is not None]
    residual_bytes = sum(p.stat().st_size for p in d.glob("*.safetensors") if p.name != ADAPTER_FILE)
    kinds: dict[str, int] = {}
    for m in cfg["target_modules"]:
        kinds[m.rsplit(".", 1)[-1]] = kinds.get(m.rsplit(".", 1)[-1], 0) + 1
    return {
        "directory": str(d),
        "kind": cfg.get("kind"),
        "format_version": cfg["format_version"],
        "base_model": cfg.get("base_model", {}),
        "rank": rank,
        "target_count": len(cfg["target_modules"]),
        "target_kinds": kinds,
        "svd": cfg.get("svd", {}),
        "dtypes": cfg.get("dtypes", {}),
        "adapter_bytes": adapter.size,
        "adapter_checksum": "verified"
        if verified
        else "not recorded (made before sorsa-tools recorded checksums)",
        "adapter_dtypes": sorted({t.dtype for t in adapter.tensors.values()}),
        "residual_bytes": residual_bytes,
        "mean_energy_captured": sum(energies) / len(energies) if energies else None,
        "min_energy_captured": min(energies) if energies else None,
        "max_reconstruction_error": max(recon) if recon else None,
        "max_s_rel_error": max(s_err) if s_err else None,
        "s_error_sampled_modules": len(s_err),
        "quantization": cfg.get("quantization"),  # QSORSA: the quantizer and its error figures
        "training": cfg.get("training"),
        "decomposition": cfg.get("decomposition"),
        "tool": cfg.get("tool", {}),
        "created": cfg.get("created"),
    }
