"""scripts/gpu_tests.py: which files it runs, how it reads pytest's summary line, and one file run end to end."""
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_tests  # noqa: E402


def test_it_runs_the_files_that_mark_gpu_tests_in_every_folder():
    files = {p.relative_to(ROOT / "tests").as_posix() for p in gpu_tests.gpu_test_files()}
    assert {"gpu/test_backends.py", "gpu/test_bsr_kernels.py", "sparse/test_masks.py", "test_export.py"} <= files
    assert "sparse/test_schedules.py" not in files


def test_it_reads_passed_failed_and_skipped_from_pytests_summary():
    assert gpu_tests.counts("3 passed, 1 failed, 2 skipped, 5 deselected in 4.20s") == {
        "passed": 3, "failed": 1, "skipped": 2}
    assert gpu_tests.counts("1 passed, 2 errors in 1.0s") == {"passed": 1, "failed": 2, "skipped": 0}


def test_one_file_runs_in_its_own_process_and_leaves_its_log(tmp_path):
    result = gpu_tests.run_file(ROOT / "tests" / "training" / "test_loss_watch.py", tmp_path, timeout=300)
    assert result["command"] == "python -m pytest -q -m gpu tests/training/test_loss_watch.py"
    assert result["failed"] == 0 and (tmp_path / "tests.training.test_loss_watch.log").read_text().strip()
