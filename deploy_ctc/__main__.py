"""``python -m deploy_ctc``: the ``deploy-ctc`` command (:mod:`deploy_ctc.cli`)."""

import sys

from deploy_ctc.cli import main

sys.exit(main())
