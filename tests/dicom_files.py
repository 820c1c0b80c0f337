"""DICOM test files built from real scans and photos at test time (never committed): Ophthalmic Photography,
Ophthalmic Tomography volumes, compressed and broken variants, with a sentinel string planted in every
identifying tag so that tests can prove it goes nowhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SENTINEL = "ZQXSENTINEL"  # in every identifying tag; must never appear in any output
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def plant_identifiers(ds, sentinel: str = SENTINEL) -> None:
    """The sentinel in every identifying tag we care about (names, ids, dates, institution, free text)."""
    ds.PatientName = f"{sentinel}^NAME"
    ds.PatientID = f"{sentinel}-ID"
    ds.PatientBirthDate = "19010101"  # a DA cannot hold text; its value is checked instead
    ds.OtherPatientIDs = f"{sentinel}-OTHER"
    ds.PatientAddress = f"{sentinel} street"
    ds.PatientComments = f"{sentinel} comments"
    ds.AccessionNumber = f"{sentinel}AC"[:16]
    ds.InstitutionName = f"{sentinel} clinic"
    ds.InstitutionAddress = f"{sentinel} road"
    ds.ReferringPhysicianName = f"{sentinel}^DOC"
    ds.OperatorsName = f"{sentinel}^OP"
    ds.StudyDescription = f"{sentinel} study"
    ds.SeriesDescription = f"{sentinel} series"
    ds.ImageComments = f"{sentinel} image comments"
    ds.StudyID = f"{sentinel}"[:16]
    ds.DeviceSerialNumber = f"{sentinel}-SN"
    ds.StationName = f"{sentinel}"[:16]


def build(pixels: np.ndarray, *, sop_class: str = OP_8BIT, patient: str = "", laterality: str = "R",
          study: str | None = None, series: str | None = None, photometric: str | None = None,
          bits: int | None = None, frames: int | None = None):
    """A valid Ophthalmic Photography / Tomography dataset (uncompressed) holding `pixels`: (H, W) grey,
    (H, W, 3) RGB, or (N, H, W) a multi-frame grey volume. The sentinel fills the identifying tags;
    `patient` (when given) replaces its PatientID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    plant_identifiers(ds)
    if patient:
        ds.PatientID = patient
    ds.PatientSex = "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20240102", "101010", "20240102", "101010"
    ds.AcquisitionDateTime = "20240102101010"
    ds.Modality = "OPT" if sop_class == OPT else "OP"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageLaterality = laterality  # the image's own; the series' Laterality is not allowed beside it
    ds.Manufacturer = "RetinaLens tests"
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
    grey = pixels.ndim == 2 or (pixels.ndim == 3 and sop_class == OPT)
    ds.SamplesPerPixel = 1 if grey else 3
    ds.PhotometricInterpretation = photometric or ("MONOCHROME2" if grey else "RGB")
    if not grey:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits or pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = ds.BitsAllocated, ds.BitsAllocated - 1, 0
    ds.Rows, ds.Columns = pixels.shape[-2:] if grey else pixels.shape[:2]
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ManufacturerModelName, ds.SoftwareVersions = "synthetic", "1"
    ds.PatientEyeMovementCommanded, ds.PupilDilated, ds.DetectorType = "NO", "NO", "CCD"
    ds.EmmetropicMagnification = ds.IntraOcularPressure = ds.HorizontalFieldOfView = None
    ds.LightPathFilterTypeStackCodeSequence = []
    if sop_class == OPT:
        _opt_modules(ds, frames or pixels.shape[0], pixels.shape[0])
    elif sop_class == SECONDARY_CAPTURE:
        ds.ConversionType = "WSD"
        del ds.ImageLaterality, ds.AnatomicRegionSequence
    else:
        ds.AcquisitionDeviceTypeCodeSequence = [_code("409899009", "SCT", "Fundus camera")]
        ds.IlluminationTypeCodeSequence = ds.ImagePathFilterTypeStackCodeSequence = ds.LensesCodeSequence = []
        ds.RefractiveStateSequence = []
        ds.SynchronizationFrameOfReferenceUID = generate_uid()
        ds.SynchronizationTrigger, ds.AcquisitionTimeSynchronized = "NO TRIGGER", "N"
        ds.NumberOfFrames = frames or 1
        ds.FrameIncrementPointer, ds.FrameTime = 0x00181063, 0
        if grey:
            ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _opt_modules(ds, frames: int, held: int) -> None:
    """The multi-frame functional groups an Ophthalmic Tomography image needs: one stack of B-scans."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds.AcquisitionDeviceTypeCodeSequence = [_code("392012008", "SCT", "Optical Coherence Tomography Scanner")]
    ds.NumberOfFrames, ds.AcquisitionNumber, ds.ContentQualification = frames, 1, "PRODUCT"
    ds.PresentationLUTShape, ds.AcquisitionDuration, ds.AxialLengthOfTheEye = "IDENTITY", 1.0, None
    # The IOD asks for the concatenation attributes: a concatenation of one instance.
    ds.ConcatenationUID, ds.SOPInstanceUIDOfConcatenationSource = generate_uid(), ds.SOPInstanceUID
    ds.ConcatenationFrameOffsetNumber, ds.InConcatenationNumber, ds.InConcatenationTotalNumber = 0, 1, 1
    ds.RefractiveStateSequence = []
    del ds.PatientOrientation, ds.PatientEyeMovementCommanded
    dim = generate_uid()
    org, index = Dataset(), Dataset()
    org.DimensionOrganizationUID = index.DimensionOrganizationUID = dim
    index.DimensionIndexPointer, index.FunctionalGroupPointer = 0x00209057, 0x00209111  # in-stack position
    ds.DimensionOrganizationSequence, ds.DimensionIndexSequence = [org], [index]
    measures, shared = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.01, 0.01], 0.1
    shared.PixelMeasuresSequence = [measures]
    anatomy, orientation = Dataset(), Dataset()
    anatomy.AnatomicRegionSequence, anatomy.FrameLaterality = [_code("81745001", "SCT", "Eye")], ds.ImageLaterality
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.FrameAnatomySequence, shared.PlaneOrientationSequence = [anatomy], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(held):
        content, item = Dataset(), Dataset()
        content.StackID, content.InStackPositionNumber, content.DimensionIndexValues = "1", i + 1, [i + 1]
        content.FrameAcquisitionDateTime = content.FrameReferenceDateTime = ds.AcquisitionDateTime
        content.FrameAcquisitionDuration = 10.0
        position = Dataset()
        position.ImagePositionPatient = [0, 0, round(0.1 * i, 4)]
        item.FrameContentSequence, item.PlanePositionSequence = [content], [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame


def save(ds, path: Path, syntax: str = EXPLICIT_LE) -> Path:
    """`ds` written as a Part 10 file with no extension (as exports are), compressed when `syntax` says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if syntax != EXPLICIT_LE:
        ds = ds.copy()
        kwargs = {"encoding_plugin": "pylibjpeg"} if syntax == JPEG_2000_LOSSLESS else {}
        if syntax == JPEG_BASELINE:
            _jpeg_baseline(ds)
        else:
            ds.compress(syntax, **kwargs)
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_baseline(ds) -> None:
    """JPEG baseline, encoded by Pillow (pydicom has no JPEG encoder); YBR_FULL_422 as the standard asks."""
    import io

    from pydicom.encaps import encapsulate

    arr = ds.pixel_array
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression, ds.LossyImageCompressionRatio, ds.LossyImageCompressionMethod = "01", 10, "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE


def grey_pixels(path: Path) -> np.ndarray:
    """A real scan's pixels as 8-bit grey (Kermany B-scans are grey JPEGs)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def rgb_pixels(path: Path, side: int = 512) -> np.ndarray:
    """A real fundus photo (or any image) as 8-bit RGB, reduced to at most `side` pixels a side."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        return np.asarray(im)


def volume(paths: list[Path]) -> np.ndarray:
    """B-scans of one patient stacked as frames (cropped to the smallest size among them)."""
    scans = [grey_pixels(p) for p in paths]
    h, w = min(s.shape[0] for s in scans), min(s.shape[1] for s in scans)
    return np.stack([s[:h, :w] for s in scans])
