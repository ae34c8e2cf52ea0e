"""`python -m pycontainerd.api.client.init`: build the static pyctr-init binary."""
import sys

from . import main

sys.exit(main())
