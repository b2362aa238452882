"""DICOM as archives hold it: recognised by content, every transfer syntax ultrasound uses,
colour converted once, non-image objects skipped, and a conformant DICOM SEG writer.

Only pixel data, geometry tags and a one-way hash of the patient (for case-level splits) are
read out of a DICOM object. No patient, study, institution or device identifier is copied into
a row, a key, a log line or an error message; the only output allowed to carry the source's
patient and study modules is the opt-in DICOM SEG (`seg_write`), which must, to be filed in the
source's study.

Callers import the module they need: `read` (recognise, read headers, decode frames), `codecs`
(the decoder plugin `read` registers with pydicom), `seg_write` (a SEG for a source's frames),
`seg_read` (a SEG as an annotation).
"""
