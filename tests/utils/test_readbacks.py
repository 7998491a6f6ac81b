import torch

from fishertune.utils.foreach import to_floats
from fishertune.utils.readbacks import ReadBacks


def test_counts_reads_by_the_package_line_that_made_them_and_ignores_reads_outside_it():
    x = torch.arange(3.0)
    with ReadBacks() as reads:
        to_floats([x[0], x[1], x[2]])       # one tolist inside the package
        float(x[0]), bool(x[1]), x.tolist()  # reads made here, outside it
    assert list(reads.lines.values()) == [1]
    (line,) = reads.lines
    assert line.startswith("fishertune/utils/foreach.py:")
