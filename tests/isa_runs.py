"""A packed-weight kernel against its reference on each vector path: the test module's
`kernel_error(case)` for every case, computed in one fresh process per path (the native build, and
the AVX2 build forced with MOECLI_CPU_ISA=avx2, which any x86 machine with AVX2 can run)."""
from __future__ import annotations

import json

import pytest

from test_quant_kernels import AVX2_OK, COMPILER, cpu_flags, run_python

ISAS = {"native": None, "avx2": "avx2"}
_results: dict[tuple[str, str], dict] = {}
needs_compiler = pytest.mark.skipif(not COMPILER, reason="no C++ compiler: the CPU kernels cannot be built")


def isa_cases(cases: list[str]) -> list:
    """pytest params (isa, case) for every path and case, skipped where the machine cannot run them."""
    return [pytest.param(isa, case, marks=[needs_compiler, pytest.mark.skipif(
        isa == "avx2" and not AVX2_OK, reason="this CPU cannot run AVX2 code")]) for isa in ISAS for case in cases]


def isa_results(module: str, cases: list[str], isa: str) -> dict:
    """{"isa": the library's vector path, "errors": {case: error}} from one process built for `isa`."""
    if (module, isa) not in _results:
        code = f"""if True:
            import json
            from {module} import cpu_kernels, kernel_error
            assert cpu_kernels.available(), cpu_kernels.status()
            print(json.dumps({{"isa": cpu_kernels.cpu_isa(), "errors": {{c: kernel_error(c) for c in {cases!r}}}}}))
        """
        out = run_python(code, **({"MOECLI_CPU_ISA": ISAS[isa]} if ISAS[isa] else {}))
        _results[(module, isa)] = json.loads(out.stdout) if out.returncode == 0 else {"failed": out.stderr[-3000:]}
    result = _results[(module, isa)]
    assert "failed" not in result, result.get("failed")
    return result


def check_isa_case(module: str, cases: list[str], isa: str, case: str, bound: float = 5e-6) -> None:
    """The path `isa` ran (AVX2 forced, else the best this CPU has) and its error on `case` is within `bound`."""
    result = isa_results(module, cases, isa)
    assert result["isa"] == ("avx2" if isa == "avx2" else "avx512" if "avx512f" in cpu_flags()
                             else "avx2" if AVX2_OK else "generic")
    assert result["errors"][case] < bound, f"{isa} ({result['isa']}): {case}"
