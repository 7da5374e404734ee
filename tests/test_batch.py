"""Cohorts on a real dask cluster: a scheduler and two worker processes, real scans, the real model.

One ``batch evaluate`` run over six real volumes (the sample CT and MR, and the four cases of
../shared/cases in NIfTI and NRRD) plus an unreadable file is shared by the tests below; a second cohort
loses a worker process mid-run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_sam_ft.cli import main
from napari_sam_ft.sample import sample_paths

CASES = Path(__file__).resolve().parents[2] / "shared" / "cases"


def case(name: str) -> Path:
    path = CASES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the cohort tests read the real cases in ../shared/cases "
                    "(beside the repository)", pytrace=False)
    return path


def cohort_rows() -> list[dict]:
    """Six real scans, two labelled slices each (the slices every case has labels on)."""
    ct, ct_labels = sample_paths("ct")
    mr, mr_labels = sample_paths("mr")
    return [
        {"image": ct, "labels": ct_labels, "slices": "14:16"},
        {"image": mr, "labels": mr_labels, "slices": "9:11"},
        {"image": case("mni152_t1.nii.gz"), "labels": case("mni152_aal_amygdala_pallidum_hippocampus.nii.gz"),
         "slices": "60:62"},
        {"image": case("pyradiomics_brain2_mr.nrrd"), "labels": case("pyradiomics_brain2_label.nrrd"),
         "slices": "9:11"},
        {"image": case("pyradiomics_lung1_ct.nrrd"), "labels": case("pyradiomics_lung1_label.nrrd"),
         "slices": "32:34"},
        {"image": case("slicer_ctchest.nrrd"), "labels": case("slicer_ctchest.seg.nrrd"), "slices": "15:17"},
    ]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "labels", "slices", "patient"])
        writer.writeheader()
        for number, row in enumerate(rows):
            writer.writerow({**row, "patient": f"P{number:03d}"})  # an extra column the manifest ignores
    return path


@pytest.fixture(scope="module")
def cluster():
    """A real scheduler with two single-threaded worker processes (each restarted by its nanny if killed)."""
    import logging

    from distributed import Client, LocalCluster

    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                         silence_logs=logging.ERROR)
    client = Client(local, set_as_default=False)
    yield local, client
    client.close()
    local.close()


@pytest.fixture(scope="module")
def evaluated(cluster, tmp_path_factory):
    """``napari-sam-ft batch evaluate`` over the six scans and one unreadable file, on the cluster."""
    folder = tmp_path_factory.mktemp("cohort")
    broken = folder / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file" * 10)
    rows = cohort_rows()
    manifest = write_manifest(folder / "manifest.csv", [*rows, {"image": broken, "labels": rows[0]["labels"]}])
    output = folder / "out"
    code = main(["batch", "evaluate", "--manifest", str(manifest), "-o", str(output),
                 "--scheduler", cluster[0].scheduler_address])
    return {"code": code, "output": output, "manifest": manifest, "rows": rows, "broken": broken,
            "results": read_results(output)}


def read_results(output: Path) -> list[dict]:
    with open(output / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def single_process_evaluate(row: dict, capsys) -> dict:
    """The report of the single-scan ``napari-sam-ft evaluate`` command, in this process.

    With the torch threads of one task on the two-worker cluster (the machine's cores shared by its two dask
    threads): bf16 sums taken in another order move a few boundary pixels, up to 0.012 Dice on a small class.
    """
    import torch

    from napari_sam_ft.batch.worker import usable_cpus

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, usable_cpus() // 2))
    try:
        capsys.readouterr()
        assert main(["evaluate", str(row["image"]), str(row["labels"]), "--slices", row["slices"], "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        torch.set_num_threads(previous)


def test_every_real_scan_is_ok_with_the_dice_of_single_process_evaluate_on_both_workers(evaluated, capsys):
    results = {Path(row["image"]).name: row for row in evaluated["results"]}
    assert len(results) == 7
    good = [results[Path(row["image"]).name] for row in evaluated["rows"]]
    assert [row["status"] for row in good] == ["ok"] * 6, [row["error"] for row in good]
    for row, source in zip(good, evaluated["rows"]):
        report = single_process_evaluate(source, capsys)
        assert float(row["dice"]) == pytest.approx(report["dice"], abs=0.01), row["image"]
        for name, entry in report["per_class"].items():
            assert float(row[f"dice_{'_'.join(name.split())}"]) == pytest.approx(entry["dice"], abs=0.01)
        assert 0.0 < float(row["seconds"]) and row["slices"] == source["slices"]
    workers = {row["worker"] for row in good}
    assert len(workers) == 2, workers
    # The model is loaded once per worker: at most one task per worker paid for loading it.
    for worker in workers:
        loads = [float(row["model_load_s"]) for row in good if row["worker"] == worker]
        assert sum(seconds > 0 for seconds in loads) <= 1, loads
    on_disk = json.loads((evaluated["output"] / "results.json").read_text())
    assert [row["status"] for row in on_disk["rows"]] == [row["status"] for row in evaluated["results"]]
    assert on_disk["settings"]["mode"] == "evaluate" and on_disk["model"]["model_id"].startswith("litemedsam")


def test_masks_have_the_geometry_of_their_input(evaluated):
    """Checked with SimpleITK: an NRRD (LPS, flipped axis) input gives a NIfTI mask on the same voxels and world."""
    import SimpleITK as sitk

    for source in evaluated["rows"][3:5]:  # brain2 and lung1 (NRRD in, NIfTI out)
        row = next(row for row in evaluated["results"] if row["image"] == str(source["image"]))
        image, mask = sitk.ReadImage(str(source["image"])), sitk.ReadImage(row["mask"])
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-4)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(source["labels"]))) > 0
        predicted = sitk.GetArrayFromImage(mask) > 0
        # Dice on the evaluated slices, in SimpleITK's voxel order: the row's Dice, so the mask lies on the
        # lesion as the reference does (a mirrored or shifted mask would score near zero here). The displayed
        # range A:B is slices A..B-1 in SimpleITK's order or, for a scan shown flipped in z, their mirror:
        # the one holding the predicted slices (a slice may be predicted empty, as fp32 does on brain2's tip).
        first, stop = (int(value) for value in source["slices"].split(":"))
        count, written = predicted.shape[0], set(np.flatnonzero(predicted.any(axis=(1, 2))))
        scored = next(candidate for candidate in (set(range(first, stop)),
                                                     {count - 1 - index for index in range(first, stop)})
                         if written <= candidate)
        in_range = np.isin(np.arange(count), sorted(scored))
        overlap = 2 * (reference & predicted).sum() / (reference[in_range].sum() + predicted.sum())
        assert overlap == pytest.approx(float(row["dice"]), abs=0.01) and overlap > 0.3, (source["image"], overlap)


def test_an_unreadable_scan_is_an_error_row_and_the_others_finish(evaluated):
    assert evaluated["code"] == 1  # the command says that a scan failed
    broken = next(row for row in evaluated["results"] if row["image"] == str(evaluated["broken"]))
    assert broken["status"] == "error"
    assert "broken.nii.gz" in broken["error"] and broken["dice"] == ""
    assert sum(row["status"] == "ok" for row in evaluated["results"]) == 6


def test_a_second_run_skips_finished_scans_and_overwrite_redoes_them(evaluated, cluster, tmp_path):
    output = evaluated["output"]
    masks = {path.name: path.stat().st_mtime_ns for path in (output / "masks").iterdir()}
    manifest = write_manifest(tmp_path / "again.csv", evaluated["rows"][:3])
    address = cluster[0].scheduler_address
    assert main(["batch", "evaluate", "--manifest", str(manifest), "-o", str(output), "--scheduler", address]) == 0
    again = read_results(output)
    assert [row["resumed"] for row in again] == ["True"] * 3
    assert {path.name: path.stat().st_mtime_ns for path in (output / "masks").iterdir()} == masks
    one = write_manifest(tmp_path / "one.csv", evaluated["rows"][:1])
    assert main(["batch", "evaluate", "--manifest", str(one), "-o", str(output), "--scheduler", address,
                 "--overwrite"]) == 0
    redone = read_results(output)
    assert redone[0]["resumed"] == "False" and redone[0]["status"] == "ok"
    assert (output / "masks" / "example_ct_sm.nii.gz").stat().st_mtime_ns > masks["example_ct_sm.nii.gz"]


def test_segment_over_a_folder_and_auto_over_a_glob_write_the_single_scan_commands_masks(cluster, tmp_path, capsys):
    """``batch segment`` (one prompt file for every scan of a folder) and ``batch auto`` (a glob) on the cluster."""
    import shutil

    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.metrics import dice
    from napari_sam_ft.volume import read_labels, read_volume

    ct, ct_labels = sample_paths("ct")
    for patient in ("patient1", "patient2"):  # the same file name twice: ids get the folder in front
        (tmp_path / "scans" / patient).mkdir(parents=True)
        shutil.copyfile(ct, tmp_path / "scans" / patient / ct.name)
    reference = read_labels(ct_labels, like=read_volume(ct)).array
    box = [float(value) for value in box_from_mask(reference[15] == 5)]
    prompts = tmp_path / "liver.json"
    prompts.write_text(json.dumps([{"slice": 15, "label": 5, "box": box}]))
    address = cluster[0].scheduler_address
    assert main(["batch", "segment", str(tmp_path / "scans"), "--prompts", str(prompts), "-o", str(tmp_path / "seg"),
                 "--scheduler", address]) == 0
    single = tmp_path / "single.nii.gz"
    assert main(["segment", str(ct), "--prompts", str(prompts), "-o", str(single)]) == 0
    expected = read_labels(single, like=read_volume(ct)).array == 5
    rows = read_results(tmp_path / "seg")
    assert sorted(row["scan_id"] for row in rows) == ["patient1_example_ct_sm", "patient2_example_ct_sm"]
    for row in rows:
        mask = read_labels(row["mask"], like=read_volume(ct)).array
        assert row["status"] == "ok" and set(np.unique(mask)) == {0, 5}
        assert dice(mask == 5, expected) > 0.99

    with pytest.raises(SystemExit):  # a scheduler or local workers, not both
        main(["batch", "auto", str(ct), "-o", str(tmp_path / "auto"), "--scheduler", address, "--workers", "2"])
    assert main(["batch", "auto", str(tmp_path / "scans" / "patient1" / "*.nii.gz"), "--slices", "15:16",
                 "-o", str(tmp_path / "auto"), "--scheduler", address]) == 0
    (row,) = read_results(tmp_path / "auto")
    mask = read_labels(row["mask"], like=read_volume(ct)).array
    assert row["status"] == "ok" and int(row["objects"]) > 0 and mask[15].any() and not mask[14].any()


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory):
    """A study folder: two patients' DICOM series of the sample CT (as a scanner writes it) and one NIfTI scan."""
    import shutil

    import nibabel as nib
    from dicom_series import write_ct_series

    ct, _ = sample_paths("ct")
    study = tmp_path_factory.mktemp("study")
    image = nib.load(str(ct))
    hounsfield = np.asarray(image.dataobj)
    flipped = np.ascontiguousarray(hounsfield[::-1, ::-1])  # columns to the patient's left, rows to posterior
    affine = image.affine.copy()
    affine[:3, 3] = (image.affine @ np.array([hounsfield.shape[0] - 1, hounsfield.shape[1] - 1, 0, 1.0]))[:3]
    affine[:3, :2] *= -1
    for patient in ("patient1", "patient2"):
        (study / patient / "dicom").mkdir(parents=True)
        write_ct_series(study / patient / "dicom", flipped, affine, description="sample CT")
    (study / "notes.txt").write_text("not a scan")
    shutil.copyfile(ct, study / ct.name)
    return study


def test_a_dicom_series_folder_is_one_scan_and_scores_what_the_nifti_scores(dicom_study, evaluated, cluster,
                                                                            tmp_path):
    from napari_sam_ft.batch import expand_inputs

    ct, ct_labels = sample_paths("ct")
    found = sorted(scan.image for scan in expand_inputs([dicom_study]))
    series = [dicom_study / patient / "dicom" for patient in ("patient1", "patient2")]
    assert found == sorted(str(path) for path in (*series, dicom_study / ct.name))
    manifest = write_manifest(tmp_path / "dicom.csv", [{"image": dicom_study / "patient1" / "dicom",
                                                        "labels": ct_labels, "slices": "14:16"}])
    assert main(["batch", "evaluate", "--manifest", str(manifest), "-o", str(tmp_path / "out"),
                 "--scheduler", cluster[0].scheduler_address]) == 0
    (row,) = read_results(tmp_path / "out")
    nifti = next(result for result in evaluated["results"] if result["image"] == str(ct))
    assert row["status"] == "ok" and row["scan_id"] == "dicom"
    assert float(row["dice"]) == pytest.approx(float(nifti["dice"]), abs=0.01)


def test_scan_lists_manifests_and_resume_keys():
    """Inputs and ids without a cluster: folders, globs, clashing names, manifests, and what a resume trusts."""
    from napari_sam_ft.batch import CohortSettings, ModelChoice, Scan, expand_inputs, read_manifest, with_scan_ids

    ct, ct_labels = sample_paths("ct")
    data = ct.parent
    found = [Path(scan.image).name for scan in expand_inputs([data])]
    assert set(found) == {path.name for path in data.iterdir() if path.name.endswith(".nii.gz")}
    assert [Path(scan.image).name for scan in expand_inputs([str(data / "example_ct*.nii.gz")])] == [ct.name]
    with pytest.raises(ValueError, match="no file matches"):
        expand_inputs([str(data / "nothing*.nii.gz")])
    ids = [scan.scan_id for scan in with_scan_ids(["/a/x/t1.nii.gz", "/a/y/t1.nii.gz", "/a/y/t2.nrrd"])]
    assert ids == ["x_t1", "y_t1", "t2"]
    identity = {"model_id": "litemedsam-1", "adapter_id": "none"}
    scan = Scan(str(ct), str(ct_labels), slices="14:16")
    key = CohortSettings(mode="evaluate").task_key(scan, identity)
    assert key == CohortSettings(mode="evaluate", model=ModelChoice(device="cpu")).task_key(scan, identity)
    assert key != CohortSettings(mode="evaluate", prompt="point").task_key(scan, identity)
    assert key != CohortSettings(mode="evaluate").task_key(scan, {**identity, "adapter_id": "a1"})
    with pytest.raises(ValueError, match="unknown prompt mode"):
        CohortSettings(mode="evaluate", prompt="lasso").check()
    from napari_sam_ft.batch.cohort import check_resources

    check_resources({"tcp://a:1": {"resources": {"GPU": 1.0}}}, {"GPU": 1})
    with pytest.raises(ValueError, match="no worker of the cluster offers the resources GPU=1"):
        check_resources({"tcp://a:1": {"resources": {}}, "tcp://b:1": {}}, {"GPU": 1})


def test_manifest_problems_get_one_clear_message(tmp_path, capsys):
    from napari_sam_ft.batch import read_manifest

    no_image = tmp_path / "no_image.csv"
    no_image.write_text("scan,labels\na.nii.gz,b.nii.gz\n")
    with pytest.raises(ValueError, match="needs an 'image' column"):
        read_manifest(no_image)
    relative = tmp_path / "relative.csv"
    relative.write_text("image,labels\nsub/a.nii.gz,\n\n")
    (scan,) = read_manifest(relative)
    assert scan.image == str(tmp_path / "sub" / "a.nii.gz") and scan.labels is None
    assert main(["batch", "evaluate", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    assert "give them as a --manifest CSV" in capsys.readouterr().err


def widened(slices: str, by: int) -> str:
    first, stop = (int(value) for value in slices.split(":"))
    return f"{first - by}:{stop + by}"


def test_a_worker_killed_mid_scan_has_its_scan_finished_elsewhere_and_no_partial_mask(cluster, tmp_path):
    from napari_sam_ft.batch import CohortSettings, Scan, run_cohort

    local, client = cluster
    rows = cohort_rows()[:4]
    # Four slices each (the two labelled ones and their neighbours), no embedding cache: seconds per scan.
    scans = [Scan(str(row["image"]), str(row["labels"]), slices=widened(row["slices"], 1)) for row in rows]
    output = tmp_path / "out"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["table"] = run_cohort(scans, output, CohortSettings(mode="evaluate"),
                                          scheduler=local.scheduler_address, disk_cache=False)
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    pids = client.run(os.getpid)
    victim = killed_key = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and runner.is_alive():
        executing = client.run(lambda dask_worker: [str(task.key) for task in dask_worker.state.executing])
        busy = [(address, key) for address, keys in executing.items() if address in pids
                for key in keys if key.startswith("napari-sam-ft-evaluate-")]
        if busy:
            victim, killed_key = busy[0]
            os.kill(pids[victim], signal.SIGKILL)
        else:
            time.sleep(0.2)
    assert victim is not None, "no worker was seen running a scan"
    runner.join(timeout=600)
    assert not runner.is_alive() and "error" not in outcome, outcome.get("error")
    table = outcome["table"]
    assert list(table["status"]) == ["ok"] * 4, list(table["error"])
    killed = table[[killed_key.startswith(f"napari-sam-ft-evaluate-{name}-") for name in table["scan_id"]]]
    assert len(killed) == 1 and killed["worker"].iloc[0] != victim  # finished by another worker process
    left = sorted(str(path.relative_to(output)) for path in output.rglob("*") if path.is_file())
    ids = sorted(table["scan_id"])
    assert left == sorted([*(f"masks/{name}.nii.gz" for name in ids), *(f"scans/{name}.json" for name in ids),
                           "results.csv", "results.json"])
