# Copyright (c) mmprecond contributors. All rights reserved.
"""Packaging for mmprecond (an OpenMMLab extension package)."""
import os
import os.path as osp
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: `setup.py develop`, which mim handles
    editable_wheel = None

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


def link_package_into_site_packages() -> None:
    """Make ``<site-packages>/mmprecond`` a symlink to the source package.

    Why: ``mim train mmprecond CONFIG`` (openmim 0.3.9) and MMEngine's
    ``mmprecond::`` configs find the package as ``<dist location>/mmprecond``,
    where the dist location is the folder holding its metadata.  An editable
    install by pip and setuptools >= 64 (PEP 660; ``mim install -e .`` runs
    the same pip) puts the metadata in site-packages but no ``mmprecond/``
    folder there: the import reaches the source tree through an import hook.
    No setuptools option changes that: ``editable_mode=compat`` also installs
    the metadata into site-packages, and since setuptools 80 even
    ``setup.py develop`` goes through pip and PEP 660.  So the editable build
    links the package into the site-packages of the interpreter that runs it
    (pip runs the build backend with the target interpreter, isolated build
    or not).  Python then imports the package through that link (it comes
    before the hook), the same source files.  The build cannot see pip's
    install scheme: with ``--user``, ``--prefix`` or ``--target`` the link
    still lands in the interpreter's default site-packages (if writable),
    not next to the metadata.  ``pip uninstall mmprecond`` leaves the link
    behind (pip never knew about it).  pip shows the messages below only
    with ``-v``.
    """
    site = sysconfig.get_paths()['purelib']
    dst = osp.join(site, 'mmprecond')
    src = osp.join(HERE, 'mmprecond')
    if osp.lexists(dst) and not osp.islink(dst):
        # a regular install's folder, which pip removes after this build:
        # linking now would not survive it
        print(f'mmprecond: {dst} exists and is not a link; run the editable '
              'install again so that mim finds the sources', file=sys.stderr)
        return
    try:
        if osp.islink(dst):
            os.remove(dst)
        os.symlink(src, dst)
    except OSError as e:
        print(f'mmprecond: could not link {dst} -> {src} ({e}); '
              '`mim train mmprecond` will not find the configs',
              file=sys.stderr)


if editable_wheel is not None:

    class EditableWheelWithLink(editable_wheel):
        """``editable_wheel`` that also links the package for mim."""

        def run(self) -> None:
            super().run()
            link_package_into_site_packages()

    CMDCLASS = {'editable_wheel': EditableWheelWithLink}
else:
    CMDCLASS = {}


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
        # only editable builds link (a regular wheel holds the package)
        cmdclass=CMDCLASS,
        license='Apache License 2.0',
        zip_safe=False,
    )
