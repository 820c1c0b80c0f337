"""De-identified copies of DICOM files, after the DICOM Basic Application Level Confidentiality Profile
(PS3.15 Annex E, Table E.1-1): the pixel data is kept, the identifying attributes go.

The profile's actions, in one table here: X (remove), Z (keep the element, empty: the IODs require it),
D (a dummy value, where the IODs require one: content and acquisition times, a device serial), U (replace a UID by another, the same for the same input, so that the instances of one study still
belong together). Private elements, overlays and curves are removed too, as the profile asks, at every
depth of nested sequences. `PatientIdentityRemoved` and `DeidentificationMethod` say what was done.

Not handled: text burned into the pixels (some devices print the patient's name into the image). The
profile leaves that to the user ("Burned In Annotation"), and so do we.
"""

from __future__ import annotations

import hashlib
import io

from .dicom import pydicom, read_dataset

# Z: the element stays, empty (Type 2 in the IODs we read); X: removed.
_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "ReferringPhysicianName", "StudyDate", "StudyTime", "ContentCreatorName")
_REMOVE = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "ConsultingPhysicianName",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientBirthTime",
    "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientMotherBirthName",
    "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "PatientTelephoneNumbers",
    "PatientTelecomInformation", "EthnicGroup", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientReligiousPreference", "PatientComments",
    "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence", "CountryOfResidence",
    "RegionOfResidence", "MedicalAlerts", "Allergies", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientState", "ResponsibleOrganization", "ResponsiblePerson", "PersonName", "PersonAddress",
    "PersonTelephoneNumbers", "StudyDescription", "SeriesDescription", "ImageComments", "StudyComments",
    "DerivationDescription", "AcquisitionComments", "RequestedProcedureDescription",
    "RequestedProcedureComments", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "ScheduledProcedureStepDescription", "ScheduledProcedureStepID",
    "RequestAttributesSequence", "ReferencedPatientSequence", "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence", "ProcedureCodeSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "AdmissionID", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfAdmissionIDSequence", "CurrentPatientLocation", "PatientInstitutionResidence",
    "VisitComments", "OrderEnteredBy", "OrderEntererLocation", "OrderCallbackPhoneNumber",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "StationName", "DeviceUID", "PlateID", "DetectorID", "GantryID",
    "ProtocolName", "TextComments", "TextString", "TopicTitle", "TopicAuthor", "TopicKeywords",
    "TopicSubject", "Arbitrary", "AuthorObserverSequence", "ParticipantSequence", "VerifyingObserverName",
    "VerifyingObserverSequence", "VerifyingOrganization", "PersonIdentificationCodeSequence",
    "AcquisitionDate", "AcquisitionTime", "SeriesDate", "SeriesTime", "OverlayDate", "OverlayTime", "CurveDate", "CurveTime",
    "InstanceCreationDate", "InstanceCreationTime", "InstanceCreatorUID", "TimezoneOffsetFromUTC",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "DigitalSignaturesSequence", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "FrameComments", "ImagePathFilterPassThroughWavelength", "DataSetTrailingPadding",
)
# D: a dummy value of the element's VR, for Type 1 elements of the OP / OPT IODs.
_DUMMY = ("ContentDate", "ContentTime", "AcquisitionDateTime", "FrameAcquisitionDateTime", "FrameReferenceDateTime",
          "DeviceSerialNumber")
_DUMMY_VALUES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
# U: UIDs that identify instances, series, studies and frames of reference, replaced consistently.
_REPLACE_UID = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                "SynchronizationFrameOfReferenceUID", "ReferencedSOPInstanceUID", "ConcatenationUID",
                "SOPInstanceUIDOfConcatenationSource", "DimensionOrganizationUID", "MediaStorageSOPInstanceUID",
                "IrradiationEventUID", "StorageMediaFileSetUID", "ReferencedFrameOfReferenceUID",
                "UID", "TransactionUID", "FiducialUID", "TargetUID")
# The profile's code (DCM 113100) and the element that records it.
_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")


def _new_uid(uid: str) -> str:
    """The replacement of `uid`: a 2.25 UID from its SHA-256 (the same input, the same output)."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(uid.encode()).digest()[:16], "big"))


def _clean(ds) -> None:
    """The profile applied to one dataset level, then to every item of every sequence below it."""
    ds.remove_private_tags()
    for keyword in _REMOVE:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword in _EMPTY:
        if keyword in ds:
            ds[keyword].value = None
    for keyword in _DUMMY:
        if keyword in ds:
            ds[keyword].value = _DUMMY_VALUES.get(ds[keyword].VR, "REMOVED")
    for keyword in _REPLACE_UID:
        if keyword in ds and ds[keyword].value:
            ds[keyword].value = _new_uid(str(ds[keyword].value))
    for tag in [t for t in ds.keys() if (t.group & 0xFF01) in (0x6000, 0x5000)]:  # overlays, curves
        del ds[tag]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _clean(item)


def deidentify(data: bytes) -> bytes:
    """A de-identified copy of a DICOM file's bytes (same pixel data, same transfer syntax); raises
    ImageDecodeError for a file that cannot be read as DICOM."""
    dcm = pydicom()
    ds = read_dataset(data)
    _clean(ds)
    if getattr(ds, "file_meta", None) is not None:
        _clean(ds.file_meta)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = _PROFILE[2]
    code = dcm.dataset.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _PROFILE
    ds.DeidentificationMethodCodeSequence = [code]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()
