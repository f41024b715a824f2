/**
 * The image the tests run (src/devenv/image.ts, no Docker, no registry) is the
 * image the Dockerfile describes: the final stage's WORKDIR, ENV, COPY, USER,
 * ENTRYPOINT and CMD match IMAGE_SPEC, and the archive built from it holds
 * what those lines put there, runs from its own files alone, and carries no
 * dev dependency.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IMAGE_SPEC, buildPoolkeeperImage, deployedImageName, fullReference, productionPackages } from '../../src/devenv/image.ts';

interface Instruction {
  keyword: string;
  args: string;
}

/** The Dockerfile's stages as lists of instructions (continuation lines joined, comments dropped). */
function dockerfileStages(text: string): Instruction[][] {
  const stages: Instruction[][] = [];
  const joined = text.replace(/\\\n/g, ' ').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  for (const line of joined) {
    const m = line.match(/^(\w+)\s+(.*)$/);
    if (!m?.[1] || m[2] === undefined) continue;
    const instruction = { keyword: m[1].toUpperCase(), args: m[2].trim() };
    if (instruction.keyword === 'FROM') stages.push([]);
    stages.at(-1)?.push(instruction);
  }
  return stages;
}

function finalStage(): Instruction[] {
  const stages = dockerfileStages(readFileSync('Dockerfile', 'utf8'));
  const last = stages.at(-1);
  assert.ok(last, 'the Dockerfile has a stage');
  return last;
}

function only(stage: Instruction[], keyword: string): string {
  const found = stage.filter((i) => i.keyword === keyword);
  assert.equal(found.length, 1, `one ${keyword} in the final stage`);
  return found[0]!.args;
}

describe('image spec and the Dockerfile', function () {
  it('WORKDIR, ENV, USER, ENTRYPOINT and CMD of the final stage are IMAGE_SPEC', function () {
    const stage = finalStage();
    assert.equal(only(stage, 'WORKDIR'), IMAGE_SPEC.workdir);
    assert.equal(only(stage, 'USER'), IMAGE_SPEC.user);
    assert.deepEqual(JSON.parse(only(stage, 'ENTRYPOINT')), IMAGE_SPEC.entrypoint);
    assert.deepEqual(JSON.parse(only(stage, 'CMD')), IMAGE_SPEC.cmd);
    const env: Record<string, string> = {};
    for (const i of stage.filter((s) => s.keyword === 'ENV')) {
      for (const pair of i.args.split(/\s+/)) {
        const [k, v] = pair.split('=');
        if (k && v !== undefined) env[k] = v;
      }
    }
    assert.deepEqual(env, IMAGE_SPEC.env);
  });

  it('the final stage copies exactly IMAGE_SPEC.copies, in order', function () {
    const copies = finalStage().filter((i) => i.keyword === 'COPY').map((i) => {
      const words = i.args.split(/\s+/).filter((w) => !w.startsWith('--'));
      const destination = words.pop()!;
      // `--from=build /src/dist` is the build stage's WORKDIR-relative dist.
      return words.map((source) => ({ source: source.replace(/^\/src\//, ''), destination }));
    }).flat();
    assert.deepEqual(copies, IMAGE_SPEC.copies.map((c) => ({ ...c })));
  });

  it('the base runs the Node.js major the repository pins, at IMAGE_SPEC.nodePath', function () {
    const from = only(finalStage(), 'FROM');
    const major = execFileSync('node_modules/.bin/node', ['--version'], { encoding: 'utf8' }).trim().match(/^v(\d+)\./)?.[1];
    assert.match(from, new RegExp(`nodejs${major}-`), `FROM ${from} is not Node.js ${major}`);
    assert.equal(IMAGE_SPEC.entrypoint[0], IMAGE_SPEC.nodePath);
  });

  it('the build stage compiles with tsconfig.build.json and prunes dev dependencies, as image.ts does', function () {
    const build = dockerfileStages(readFileSync('Dockerfile', 'utf8'))[0]!.filter((i) => i.keyword === 'RUN').map((i) => i.args).join('\n');
    assert.match(build, /tsc -p tsconfig\.build\.json/);
    assert.match(build, /npm prune --omit=dev/);
  });

  it('names the image as deploy/ does', function () {
    assert.equal(fullReference(deployedImageName()), 'docker.io/poolkeeper/poolkeeper:0.1.0');
    assert.equal(fullReference('busybox:1'), 'docker.io/library/busybox:1');
    assert.equal(fullReference('registry.k8s.io/pause:3.10'), 'registry.k8s.io/pause:3.10');
  });
});

describe('image archive', function () {
  this.timeout(600_000);
  let root: string;
  let config: { config: { User: string; Env: string[]; Entrypoint: string[]; Cmd: string[]; WorkingDir: string }; rootfs: { diff_ids: string[] } };
  let index: { manifests: { annotations: Record<string, string> }[] };

  before(function () {
    const image = buildPoolkeeperImage();
    console.log(`      image ${image.reference}: ${(image.compressedBytes / 1e6).toFixed(1)} MB gzipped, ${(image.uncompressedBytes / 1e6).toFixed(1)} MB unpacked${image.cached ? ' (cached)' : ''}`);
    root = mkdtempSync(join(tmpdir(), 'poolkeeper-image-test-'));
    const layout = join(root, 'layout');
    const rootfs = join(root, 'rootfs');
    execFileSync('mkdir', ['-p', layout, rootfs]);
    execFileSync('tar', ['-xf', image.path, '-C', layout]);
    index = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8')) as typeof index;
    const blob = (digest: string): Buffer => readFileSync(join(layout, 'blobs', 'sha256', digest.replace('sha256:', '')));
    const manifestDigest = (index.manifests[0] as unknown as { digest: string }).digest;
    const manifest = JSON.parse(blob(manifestDigest).toString()) as { config: { digest: string }; layers: { digest: string }[] };
    config = JSON.parse(blob(manifest.config.digest).toString()) as typeof config;
    for (const layer of manifest.layers) execFileSync('tar', ['-xzf', join(layout, 'blobs', 'sha256', layer.digest.replace('sha256:', '')), '-C', rootfs]);
  });

  after(function () {
    if (root) rmSync(root, { recursive: true, force: true });
  });

  it('has the config IMAGE_SPEC describes and the name deploy/ uses', function () {
    assert.equal(config.config.User, IMAGE_SPEC.user);
    assert.equal(config.config.WorkingDir, IMAGE_SPEC.workdir);
    assert.deepEqual(config.config.Entrypoint, IMAGE_SPEC.entrypoint);
    assert.deepEqual(config.config.Cmd, IMAGE_SPEC.cmd);
    assert.ok(config.config.Env.includes('NODE_ENV=production'));
    // The base (node and its libraries), then one layer per COPY.
    assert.equal(config.rootfs.diff_ids.length, 1 + IMAGE_SPEC.copies.length);
    assert.equal(index.manifests[0]?.annotations['io.containerd.image.name'], fullReference(deployedImageName()));
  });

  it('holds the entry point, the native socket I/O, package.json and the production dependencies, and no dev dependency', function () {
    const rootfs = join(root, 'rootfs');
    for (const path of [IMAGE_SPEC.nodePath, '/app/dist/bin/poolkeeper.js', '/app/build/socket-io.node', '/app/package.json', '/app/node_modules/pg/package.json', '/app/node_modules/@kubernetes/client-node/package.json']) {
      assert.ok(existsSync(join(rootfs, path)), `${path} in the image`);
    }
    const installed = readdirSync(join(rootfs, 'app', 'node_modules'));
    for (const dev of ['typescript', 'mocha', 'eslint', 'fast-check', 'node']) assert.ok(!installed.includes(dev), `dev dependency ${dev} in the image`);
    assert.ok(productionPackages().length > 20);
  });

  it('runs its entry point from its own files alone (chroot, as the image user)', function () {
    if (process.getuid?.() !== 0) this.skip();
    const rootfs = join(root, 'rootfs');
    const chroot = execFileSync('sh', ['-c', 'command -v chroot'], { encoding: 'utf8' }).trim();
    const help = spawnSync(chroot, ['--userspec=65532:65532', rootfs, ...IMAGE_SPEC.entrypoint, ...IMAGE_SPEC.cmd], { encoding: 'utf8', env: { NODE_ENV: 'production', PATH: '/usr/bin:/bin' }, cwd: '/' });
    assert.equal(help.status, 0, `${help.stdout}${help.stderr}`);
    assert.match(help.stdout, /usage: poolkeeper <command>[^]*controller[^]*webhook[^]*sidecar/);
    // The sidecar's native socket I/O loads with the image's own node and libraries.
    const native = spawnSync(chroot, ['--userspec=65532:65532', rootfs, IMAGE_SPEC.nodePath, '-e', "process.exit(typeof require('/app/build/socket-io.node').open === 'function' ? 0 : 3)"], { encoding: 'utf8', env: { PATH: '/usr/bin:/bin' }, cwd: '/' });
    assert.equal(native.status, 0, `the native module did not load in the image: ${native.stdout}${native.stderr}`);
  });
});
