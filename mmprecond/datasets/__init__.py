# Copyright (c) mmprecond contributors. All rights reserved.
