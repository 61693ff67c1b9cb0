"""Support code for the tests (not tests themselves): the reference model, the crash and ring workloads run as
subprocesses, the typing example, and helpers shared by several test files. tests/conftest.py puts tests/ on
sys.path, so test files import these as `support.<module>`."""
