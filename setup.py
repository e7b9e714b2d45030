# Copyright (c) mmprecond contributors. All rights reserved.
"""Packaging for mmprecond (an OpenMMLab extension package)."""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def get_version() -> str:
    scope: dict = {}
    with open(osp.join(HERE, 'mmprecond', 'version.py')) as f:
        exec(compile(f.read(), 'version.py', 'exec'), scope)
    return scope['__version__']


def add_mim_extension() -> None:
    """Expose ``configs/``, ``tools/`` and the model index in ``mmprecond/.mim``.

    ``mim train mmprecond <cfg>`` and ``_base_ = 'mmprecond::...'`` look for
    them there.  They are symlinks where the file system allows, else copies.
    """
    mim_dir = osp.join(HERE, 'mmprecond', '.mim')
    os.makedirs(mim_dir, exist_ok=True)
    for name in ('configs', 'tools', 'model-index.yml'):
        src, dst = osp.join(HERE, name), osp.join(mim_dir, name)
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        try:
            os.symlink(osp.relpath(src, mim_dir), dst)
        except OSError:
            if osp.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    setup(
        name='mmprecond',
        version=get_version(),
        description='Preconditioned (second-order) optimizers for MMDetection '
        'and MMPretrain',
        long_description=open(osp.join(HERE, 'README.md')).read()
        if osp.exists(osp.join(HERE, 'README.md')) else '',
        long_description_content_type='text/markdown',
        packages=find_packages(include=['mmprecond', 'mmprecond.*']),
        include_package_data=True,
        package_data={
            'mmprecond': [
                '.mim/configs/**/*', '.mim/tools/**/*', '.mim/model-index.yml'
            ]
        },
        python_requires='>=3.8',
        install_requires=[
            'torch>=2.0', 'mmengine>=0.10.0,<1.0.0', 'mmcv>=2.0.0,<2.2.0',
            'numpy', 'pycocotools'
        ],
        extras_require={
            'det': ['mmdet>=3.3.0,<3.4.0'],
            'cls': ['mmpretrain>=1.2.0,<1.3.0'],
            'tests': ['pytest', 'pytest-timeout', 'pytest-xdist', 'ruff'],
            # third-party optimizers for compare_optimizers.py
            'peers': ['pytorch-optimizer>=4.1,<5', 'singd>=0.0.5,<0.1'],
        },
        license='Apache License 2.0',
        zip_safe=False,
    )
