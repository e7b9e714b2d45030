# Copyright (c) mmprecond contributors. All rights reserved.
"""Compatibility fixes for the OpenMMLab stack on new torch / numpy."""
