"""The physics step: MJX's JAX pipeline, corrected where it departs from MuJoCo's C engine.

Gymnasium's tasks run on C MuJoCo 4.0. On the SAC tasks MJX 3.17 departs from it in three
places, each found and measured with the parity harness (``envs.parity``; numbers in
``docs/ENVIRONMENTS.md``):

1. **RK4 on free and ball joints.** C 4.0 integrates rotations with a Lie-group
   (Runge-Kutta-Munthe-Kaas) RK4: the angular velocity of each stage passes through the
   inverse right Jacobian of SO(3) at the rotation accumulated for that stage, before the
   stages are combined. MJX combines the raw angular velocities (1e-6 per step on a free
   body). Matters for Ant and Humanoid.
2. **The tangent of plane-capsule contacts.** C aligns it with the capsule axis projected
   on the plane; MJX falls back to a fixed tangent whenever the capsule is within 30 degrees
   of the plane normal. With pyramidal friction cones the tangent changes the forces
   (Ant's steep legs: qvel off by up to 2.5 on a third of the steps).
3. **Sphere-capsule and capsule-capsule contacts.** MJX regularizes the closest-point
   projections (``/ (|ab|^2 + 1e-6)``), moving contact points by ~1e-6 and normals by
   ~1e-5; C computes them exactly (Humanoid's self-contacts).

``Physics(model).step(d)`` applies the three corrections; ``Physics(model, faithful=False)``
is plain ``mjx.step``. The corrections use MJX's own building blocks, some of them private, which is
why ``mujoco-mjx`` is pinned; the parity tests fail if a new MJX moves them.
"""

from __future__ import annotations

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import mujoco
import numpy as np

with contextlib.redirect_stdout(io.StringIO()):  # silence MJX's missing-Warp notice
    from mujoco import mjx
    from mujoco.mjx._src import forward as mjx_forward
    from mujoco.mjx._src import scan as mjx_scan

PLANE = int(mujoco.mjtGeom.mjGEOM_PLANE)
SPHERE = int(mujoco.mjtGeom.mjGEOM_SPHERE)
CAPSULE = int(mujoco.mjtGeom.mjGEOM_CAPSULE)
# The classic RK4 tableau: stage i moves by a_i times the previous stage's derivative.
RK4_A = np.array([0.5, 0.5, 1.0])
RK4_B = np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6])


class Physics:
    """An MJX model with the static facts the corrections need: which qvel entries are
    rotations, and which contact slots pair a plane, sphere or capsule with a capsule."""

    def __init__(self, model: mjx.Model, faithful: bool = True):
        self.model = model
        self.faithful = faithful
        if faithful:  # (the JAX impl alone; MuJoCo Warp runs its own step)
            self.rotation_dofs = _rotation_dofs(model)
            self.contact_slots = _contact_slots(model)

    def step(self, d: mjx.Data) -> mjx.Data:
        """One physics step. Keeps every ``Data`` leaf's dtype (under x64 MJX returns some
        integer fields as int64 where ``make_data`` made int32, which loops reject)."""
        m = self.model
        if not self.faithful:
            return _same_dtypes(mjx.step(m, d), d)
        integrator = m.opt.integrator
        if integrator == mujoco.mjtIntegrator.mjINT_RK4:
            return _same_dtypes(self.rk4(d), d)
        after = _same_dtypes(self.forward(d), d)
        if integrator == mujoco.mjtIntegrator.mjINT_EULER:
            after = mjx.euler(m, after)
        elif integrator == mujoco.mjtIntegrator.mjINT_IMPLICITFAST:
            after = mjx.implicit(m, after)
        else:
            raise NotImplementedError(f"integrator {integrator} is not supported by MJX")
        return _same_dtypes(after, d)

    def forward(self, d: mjx.Data) -> mjx.Data:
        """``mjx.forward``, with C's contact geometry when faithful (corrections 2, 3)."""
        m = self.model
        if not self.faithful:
            return mjx.forward(m, d)
        d = mjx.kinematics(m, d)
        d = mjx.com_pos(m, d)
        d = mjx.camlight(m, d)
        d = mjx.tendon(m, d)
        d = mjx.crb(m, d)
        d = mjx.tendon_armature(m, d)
        d = mjx.factor_m(m, d)
        d = mjx.collision(m, d)
        d = self._c_contacts(d)
        d = mjx.make_constraint(m, d)
        d = mjx.transmission(m, d)
        d = mjx.sensor_pos(m, d)
        d = mjx.fwd_velocity(m, d)
        d = mjx.sensor_vel(m, d)
        d = mjx.fwd_actuation(m, d)
        d = mjx.fwd_acceleration(m, d)
        if d._impl.efc_J.size == 0:
            return d.replace(qacc=d.qacc_smooth)
        return mjx.sensor_acc(m, mjx.solve(m, d))

    def rk4(self, d: mjx.Data) -> mjx.Data:
        """RK4 as C MuJoCo 4.0 runs it (correction 1), from ``d`` before ``forward``.

        Stage i starts at ``q0 (+) h a_i k_{i-1}``; ``k_i`` is the stage velocity, except
        that each rotational dof triple becomes ``Jr^-1(h a_i k_{i-1}) w_i``. The step ends
        at ``q0 (+) h sum_j b_j k_j`` and ``v0 + h sum_j b_j qacc_j``. All four stages run
        in a ``lax.scan``, which compiles one forward pass for them instead of two (one
        for the first stage and one for the scan of the other three) or four. The first
        stage (``a = 0``) starts exactly at ``d``: its position and velocity are selected,
        not integrated by zero, and the sums start from its terms, so the arithmetic is that
        of a separate first forward pass.
        """
        m, h, d0 = self.model, self.model.opt.timestep, d
        integrate = functools.partial(mjx_forward._integrate_pos, dt=h)

        def stage(carry, abf):
            k, qacc, act_dot, vsum, asum, adsum, d = carry
            a, b, first = abf
            dq = a * k
            moved = mjx_scan.flat(m, integrate, "jqv", "q", m.jnt_type, d0.qpos, dq)
            qpos = jnp.where(first, d0.qpos, moved)
            qvel = jnp.where(first, d0.qvel, d0.qvel + a * h * qacc)
            act = jnp.where(first, d0.act, d0.act + a * h * act_dot)
            time = jnp.where(first, d0.time, d0.time + a * h)
            d = d.replace(qpos=qpos, qvel=qvel, act=act, time=time)
            d = _same_dtypes(self.forward(d), d)
            k = jnp.where(first, qvel, _lie_correct(self.rotation_dofs, qvel, h * dq))
            vsum = jnp.where(first, b * k, vsum + b * k)
            asum = jnp.where(first, b * d.qacc, asum + b * d.qacc)
            adsum = jnp.where(first, b * d.act_dot, adsum + b * d.act_dot)
            return (k, d.qacc, d.act_dot, vsum, asum, adsum, d), None

        # The first stage selects past every carried value but ``d``, so the carry starts
        # from ``d0``'s own leaves of the right shapes rather than zeros: under vmap those
        # are batched (``zeros_like`` is not), and vmap's fixpoint over the scan then
        # batches the forward pass once instead of twice (a third less tracing).
        init = (d0.qvel, d0.qacc, d0.act_dot, d0.qvel, d0.qacc, d0.act_dot, d0)
        dtype = d0.qvel.dtype
        tableau = (jnp.asarray([0.0, *RK4_A], dtype), jnp.asarray(RK4_B, dtype),
                   jnp.asarray([True, False, False, False]))  # fmt: skip
        (_, _, _, vsum, asum, adsum, d), _ = jax.lax.scan(stage, init, tableau)
        d = d.replace(qpos=d0.qpos, qvel=d0.qvel, act=d0.act, time=d0.time)
        return mjx_forward._advance(m, d, adsum, asum, vsum)

    def _c_contacts(self, d: mjx.Data) -> mjx.Data:
        """Recompute, slot by slot, what C computes differently (see the module doc)."""
        contact = d._impl.contact
        g, dist, pos, frame = contact.geom, contact.dist, contact.pos, contact.frame
        m = self.model
        idx = self.contact_slots["plane-capsule"]
        if idx.size:  # only the tangent differs
            frame = frame.at[idx].set(_capsule_frame(d, g[idx], frame[idx, 0]))
        for kind, exact in (
            ("sphere-capsule", _sphere_capsule),
            ("capsule-capsule", _capsule_capsule),
        ):
            idx = self.contact_slots[kind]
            if idx.size:
                new_dist, new_pos, normal = exact(m, d, g[idx])
                dist = dist.at[idx].set(new_dist)
                pos = pos.at[idx].set(new_pos)
                frame = frame.at[idx].set(_default_frame(normal))
        contact = contact.replace(dist=dist, pos=pos, frame=frame)
        return d.tree_replace({"_impl.contact": contact})


def _rotation_dofs(m: mjx.Model) -> np.ndarray:
    """qvel indices (n, 3) of the angular velocity of every free and ball joint."""
    starts = []
    for jtype, adr in zip(np.asarray(m.jnt_type), np.asarray(m.jnt_dofadr), strict=True):
        if jtype == mujoco.mjtJoint.mjJNT_FREE:
            starts.append(adr + 3)
        elif jtype == mujoco.mjtJoint.mjJNT_BALL:
            starts.append(adr)
    return np.asarray(starts, int).reshape(-1, 1) + np.arange(3)


def _lie_correct(rot: np.ndarray, qvel: jax.Array, dq: jax.Array) -> jax.Array:
    """Apply the inverse right Jacobian of SO(3) at the rotation ``dq`` to the angular
    parts of ``qvel``: ``w + w x ... = w + 1/2 W x w + c(|W|) W x (W x w)``."""
    if rot.size == 0:
        return qvel
    w, omega = qvel[rot], dq[rot]
    theta2 = jnp.sum(omega * omega, axis=-1, keepdims=True)
    theta = jnp.sqrt(theta2)
    small = theta < 1e-4
    t = jnp.where(small, 1.0, theta)
    c = jnp.where(
        small,
        1 / 12 + theta2 / 720,  # series of the expression below, exact to O(theta^4)
        1 / (t * t) - (1 + jnp.cos(t)) / (2 * t * jnp.sin(t)),
    )
    ow = jnp.cross(omega, w)
    return qvel.at[rot].set(w + 0.5 * ow + c * jnp.cross(omega, ow))


def local_device() -> jax.Device:
    """Where an env keeps its model and template ``Data``: JAX's default device if one is
    set, else this process's first. (MJX's own default, ``jax.devices()[0]``, belongs to
    another process in a run over several.)"""
    chosen = jax.config.jax_default_device
    if isinstance(chosen, str):  # a platform name
        return jax.local_devices(backend=chosen)[0]
    return chosen or jax.local_devices()[0]


# ---- contacts as C computes them -------------------------------------------------------------


def _contact_slots(m: mjx.Model) -> dict[str, np.ndarray]:
    """Contact slots by geom-type pair. MJX fixes each slot's geom pair when it builds the
    model's collision groups, so one tiny compiled call reads them."""
    data = mjx.make_data(m, device=local_device())
    if data._impl.contact.dist.shape[0] == 0:
        geoms = np.zeros((0, 2), int)
    else:
        geoms = np.asarray(jax.jit(lambda d: mjx.collision(m, d)._impl.contact.geom)(data))
    types = np.asarray(m.geom_type)[geoms].reshape(-1, 2)
    pairs = {"plane-capsule": (PLANE, CAPSULE), "sphere-capsule": (SPHERE, CAPSULE),
             "capsule-capsule": (CAPSULE, CAPSULE)}  # fmt: skip
    return {
        name: np.nonzero((types[:, 0] == t1) & (types[:, 1] == t2))[0]
        for name, (t1, t2) in pairs.items()
    }


def _capsule_frame(d: mjx.Data, g: jax.Array, normal: jax.Array) -> jax.Array:
    """C's plane-capsule frame: normal, the capsule axis made orthogonal to it, their
    cross product (C falls back to a fixed tangent only for an axis along the normal)."""
    axis = d.geom_xmat[g[:, 1]][:, :, 2]
    y = axis - normal * jnp.sum(normal * axis, -1, keepdims=True)
    norm = jnp.linalg.norm(y, axis=-1, keepdims=True)
    y = jnp.where(
        norm > 1e-15, y / jnp.where(norm > 1e-15, norm, 1.0), _default_frame(normal)[:, 1]
    )
    return jnp.stack([normal, y, jnp.cross(normal, y)], axis=1)


def _default_frame(normal: jax.Array) -> jax.Array:
    """C's ``mju_makeFrame`` without a tangent hint: (0,1,0), or (0,0,1) when the normal
    is close to y, made orthogonal to the normal."""
    near_y = (jnp.abs(normal[:, 1]) < 0.5)[:, None]
    y = jnp.where(near_y, jnp.asarray([0.0, 1.0, 0.0]), jnp.asarray([0.0, 0.0, 1.0]))
    y = y - normal * jnp.sum(normal * y, -1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    return jnp.stack([normal, y, jnp.cross(normal, y)], axis=1)


def _sphere_sphere(p1, r1, p2, r2):
    """C's ``mjraw_SphereSphere``: distance, midpoint and normal from geom 1 to geom 2."""
    dif = p2 - p1
    length = jnp.linalg.norm(dif, axis=-1, keepdims=True)
    normal = dif / jnp.where(length > 0, length, 1.0)
    dist = length[:, 0] - r1 - r2
    return dist, p1 + normal * (r1 + 0.5 * dist)[:, None], normal


def _capsule(m, d, ids):
    """Centre, radius and half-axis vector of capsules ``ids``."""
    size = m.geom_size[ids]
    return d.geom_xpos[ids], size[:, 0], d.geom_xmat[ids][:, :, 2] * size[:, 1:2]


def _sphere_capsule(m, d, g):
    p1, r1 = d.geom_xpos[g[:, 0]], m.geom_size[g[:, 0], 0]
    p2, r2, axis = _capsule(m, d, g[:, 1])
    x = jnp.sum(axis * (p1 - p2), -1) / jnp.sum(axis * axis, -1)
    return _sphere_sphere(p1, r1, p2 + jnp.clip(x, -1.0, 1.0)[:, None] * axis, r2)


def _capsule_capsule(m, d, g):
    """C's closest points of two segments (its non-parallel branch, the only one that can
    fill MJX's single contact slot per capsule pair)."""
    p1, r1, a1 = _capsule(m, d, g[:, 0])
    p2, r2, a2 = _capsule(m, d, g[:, 1])
    dif = p1 - p2
    ma, mb, mc = (a1 * a1).sum(-1), -(a1 * a2).sum(-1), (a2 * a2).sum(-1)
    u, v = -(a1 * dif).sum(-1), (a2 * dif).sum(-1)
    det = ma * mc - mb * mb
    det = jnp.where(det != 0, det, 1.0)
    x1, x2 = (mc * u - mb * v) / det, (ma * v - mb * u) / det
    # Clamp the first projection, re-project the second; then the other way round.
    x2 = jnp.where(x1 > 1, (v - mb) / mc, jnp.where(x1 < -1, (v + mb) / mc, x2))
    x1 = jnp.clip(x1, -1.0, 1.0)
    x1 = jnp.where(x2 > 1, jnp.clip((u - mb) / ma, -1, 1), x1)
    x1 = jnp.where(x2 < -1, jnp.clip((u + mb) / ma, -1, 1), x1)
    x2 = jnp.clip(x2, -1.0, 1.0)
    return _sphere_sphere(p1 + x1[:, None] * a1, r1, p2 + x2[:, None] * a2, r2)


def _same_dtypes(new: mjx.Data, like: mjx.Data) -> mjx.Data:
    return jax.tree.map(lambda x, y: x.astype(y.dtype), new, like)
