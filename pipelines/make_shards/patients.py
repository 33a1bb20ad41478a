"""Stage 2b, patients: patient ids from DICOM headers and label CSVs leave this stage as salted hashes only.

A hospital's PatientID (or a CSV's patient column) is identifying; the split needs to group a patient's
images, not to know who they are. Each such id becomes `HMAC-SHA256(salt, id)`, first 16 hex digits (64
bits: no collision expected below ~10^9 patients), in the sample json and everywhere else. Ids taken from
Kermany file names (`person123`) are already in the file name, which stays as it is, and are kept.

The salt: `--patient-salt` (kept secret: it is not written anywhere; give the same one to get the same ids
on a rebuild or a later delivery), or a random one recorded in the manifest (so whoever holds the manifest
can link a known PatientID to its hash: share shards built with `--patient-salt` when that matters).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import Counter
from dataclasses import replace

from pipelines.make_shards.scan import FROM_FILE_NAME, Entry

FROM_DICOM = "DICOM PatientID"
HASH_RULE = "HMAC-SHA256(salt, id), first 16 hex digits"


def hash_patient(patient: str, salt: str) -> str:
    return hmac.new(salt.encode(), patient.encode(), hashlib.sha256).hexdigest()[:16]


def pseudonymize(entries: list[Entry], header_patients: dict[str, str], salt: str | None
                 ) -> tuple[list[Entry], dict]:
    """Entries with a CSV patient id, else a DICOM PatientID, get its salted hash as `patient`; returns them
    and the manifest's `patients` record (no id, no given salt; `from` counts the readable inputs).

    A patient column is the user's explicit mapping, so it wins over the header: anonymised DICOM often
    carries one constant PatientID ("ANONYMOUS"), which would make every image one patient and put the whole
    set in one split. `distinct` (the number of different ids) makes such a collapse visible."""
    identifying = [e for e in entries if e.path in header_patients or e.patient_from != FROM_FILE_NAME]
    record = {"from": {}, "hashed": len(identifying)}
    if identifying:
        key = salt if salt is not None else secrets.token_hex(16)
        record.update(rule=HASH_RULE, salt=None if salt is not None else key,
                      salt_from="--patient-salt (not recorded)" if salt is not None else
                      "generated for this run (pass it as --patient-salt to reproduce these ids)")
    out = []
    for entry in entries:
        if entry.patient_from != FROM_FILE_NAME:
            entry = replace(entry, patient=hash_patient(entry.patient, key))
        elif entry.path in header_patients:
            entry = replace(entry, patient=hash_patient(header_patients[entry.path], key), patient_from=FROM_DICOM)
        out.append(entry)
    record["from"] = dict(sorted(Counter(e.patient_from for e in out).items()))
    record["distinct"] = len({e.patient for e in out})
    return out, record
