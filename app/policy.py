"""Who may see and do what with a prescription: one table, from which every check derives.

`ROLES` says, per role, which prescriptions it sees (a `Relation`) and whether it reads their
personal fields; `PERMISSIONS` says, per mutation and role, which relation must hold to act
(and, where one transition serves two roles, from which statuses each may take it). Everything
else is computed from these two tables, so the four places that enforce them cannot drift:

- the query filter of a listing (`visibility_filter`, a MongoDB filter),
- the node check of a read or a mutation (`can_see`, on a document),
- the routing of sequenced events to subscribers (`Tags.of` / `Tags.can_see`, on the event's
  tags: the same fields, the patient as a keyed hash),
- the mutation checks (`check_role` before anything is read, `check_may_act` on the document).

A relation is a choice of alternatives, each a conjunction of "the prescription's field equals
the token's claim". An alternative that needs a claim the token lacks (a PHARMACIST, COURIER or
PARTNER token without `org`) never holds: such a token sees nothing, and a listing or
subscription says why. Which transitions exist is the domain's (`app.prescriptions`); who may
take them is this module's.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.auth import Role, Viewer
from app.prescriptions import PERSONAL_FIELDS, TRANSITIONS, Refused, Status


class Claim(enum.StrEnum):
    SUB = "sub"
    ORG = "org"


@dataclass(frozen=True)
class Match:
    """The prescription's `field` (a dotted path) equals the token's `claim`."""

    field: str
    claim: Claim


@dataclass(frozen=True)
class Relation:
    """How a viewer relates to a prescription: any alternative holds, each a conjunction of
    matches (one empty alternative: every prescription)."""

    name: str
    alternatives: tuple[tuple[Match, ...], ...]


ANY = Relation("anyone with the role", ((),))
OWN_PRESCRIBER = Relation("the prescriber who filed it", ((Match("prescriber", Claim.SUB),),))
OWN_PATIENT = Relation("its patient", ((Match("patient.id", Claim.SUB),),))
PHARMACY = Relation("a pharmacist of its pharmacy", ((Match("pharmacy", Claim.ORG),),))
# A courier id is unique only within its company: both must match.
ASSIGNED_COURIER = Relation(
    "its assigned courier (courier id and company)",
    ((Match("courier", Claim.SUB), Match("courierOrganization", Claim.ORG)),),
)
ORGANIZATION = Relation(
    "its pharmacy or courier company",
    ((Match("pharmacy", Claim.ORG),), (Match("courierOrganization", Claim.ORG),)),
)


@dataclass(frozen=True)
class RolePolicy:
    sees: Relation
    personal_data: bool  # reads patient, medications, notes, reason, erased.reason


ROLES: dict[Role, RolePolicy] = {
    Role.PRESCRIBER: RolePolicy(OWN_PRESCRIBER, personal_data=True),
    Role.PHARMACIST: RolePolicy(PHARMACY, personal_data=True),
    Role.COURIER: RolePolicy(ASSIGNED_COURIER, personal_data=True),
    Role.PATIENT: RolePolicy(OWN_PATIENT, personal_data=True),
    Role.PARTNER: RolePolicy(ORGANIZATION, personal_data=True),
    Role.AUDITOR: RolePolicy(ANY, personal_data=False),
    Role.ADMIN: RolePolicy(ANY, personal_data=True),
}


@dataclass(frozen=True)
class Permission:
    """`role` may take `mutation` on a prescription it sees when `relation` holds, and only
    from `statuses` (None: every status the transition leaves)."""

    mutation: str
    role: Role
    relation: Relation
    statuses: frozenset[Status] | None = None


PERMISSIONS: dict[tuple[str, Role], Permission] = {
    (p.mutation, p.role): p
    for p in (
        Permission("issuePrescription", Role.PRESCRIBER, ANY),
        Permission("cancelPrescription", Role.PRESCRIBER, OWN_PRESCRIBER),
        Permission("rejectPrescription", Role.PHARMACIST, PHARMACY),
        Permission("dispensePrescription", Role.PHARMACIST, PHARMACY),
        Permission("handToCourier", Role.PHARMACIST, PHARMACY),
        # The courier delivers what it carries; the pharmacy hands over at the counter (pick-up).
        Permission(
            "deliverPrescription", Role.COURIER, ASSIGNED_COURIER, frozenset({Status.IN_TRANSIT})
        ),
        Permission("deliverPrescription", Role.PHARMACIST, PHARMACY, frozenset({Status.DISPENSED})),
        Permission("confirmReceipt", Role.PATIENT, OWN_PATIENT),
        Permission("erasePersonalData", Role.ADMIN, ANY),
    )
}

MUTATIONS = ("issuePrescription", *TRANSITIONS, "erasePersonalData")
MUTATION_ROLES: dict[str, frozenset[Role]] = {
    m: frozenset(role for (mutation, role) in PERMISSIONS if mutation == m) for m in MUTATIONS
}


class NotAllowed(Exception):
    """A read the viewer may not make at all (not merely an empty answer); the message says
    why and is safe to show."""


# --- deriving the checks -------------------------------------------------------------------


def _claim(viewer: Viewer, claim: Claim) -> str | None:
    return viewer.subject if claim is Claim.SUB else viewer.organization


def _required(viewer: Viewer, relation: Relation) -> list[dict[str, str]]:
    """The relation's alternatives as {field: the value it must have} for this viewer, without
    those that need a claim the token lacks (they never hold)."""
    out = []
    for alternative in relation.alternatives:
        wanted = {m.field: _claim(viewer, m.claim) for m in alternative}
        if all(wanted.values()):
            out.append({f: v for f, v in wanted.items() if v})
    return out


def _field(doc: Mapping[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _holds(viewer: Viewer, relation: Relation, doc: Mapping[str, Any]) -> bool:
    return any(
        all(_field(doc, f) == v for f, v in wanted.items())
        for wanted in _required(viewer, relation)
    )


def visibility_filter(viewer: Viewer) -> dict[str, Any] | None:
    """A MongoDB filter selecting the prescriptions `viewer` may read (None: nothing)."""
    alternatives = _required(viewer, ROLES[viewer.role].sees)
    if not alternatives:
        return None
    if len(alternatives) == 1:
        return dict(alternatives[0])
    return {"$or": [dict(a) for a in alternatives]}


def check_sees_any(viewer: Viewer) -> dict[str, Any]:
    """`visibility_filter`, or NotAllowed saying which claim the token lacks to see anything."""
    found = visibility_filter(viewer)
    if found is None:
        claims = sorted(
            {m.claim.value for alt in ROLES[viewer.role].sees.alternatives for m in alt}
            - {c.value for c in Claim if _claim(viewer, c)}
        )
        raise NotAllowed(
            f"a {viewer.role.value} token needs an {' and '.join(map(repr, claims))} claim "
            "to see prescriptions"
        )
    return found


def can_see(viewer: Viewer, doc: Mapping[str, Any]) -> bool:
    """Whether `viewer` may read the prescription `doc` (and so learn that it exists)."""
    return _holds(viewer, ROLES[viewer.role].sees, doc)


def personal_data_hidden(viewer: Viewer | None) -> bool:
    """Whether the personal fields (and the erasure's reason) are withheld from `viewer`."""
    return viewer is None or not ROLES[viewer.role].personal_data


def check_patient_filter(viewer: Viewer) -> None:
    """A filter by patient would reveal whom a prescription is for: refused to a viewer from
    whom personal data is hidden."""
    if personal_data_hidden(viewer):
        raise NotAllowed(
            f"{viewer.role.value.lower()}s cannot filter by patient: personal data is withheld "
            "from them"
        )


def check_role(viewer: Viewer, mutation: str) -> None:
    """Raises Refused("Forbidden") unless the viewer's role may attempt `mutation` at all
    (checked before the prescription is read: a wrong role learns nothing about it)."""
    roles = MUTATION_ROLES[mutation]
    if viewer.role not in roles:
        names = ", ".join(sorted(r.value for r in roles))
        raise Refused(
            "Forbidden", f"{mutation} needs the role {names}; you are {viewer.role.value}"
        )


def may_act(viewer: Viewer, doc: Mapping[str, Any], mutation: str) -> str | None:
    """Why `viewer` may not take `mutation` on `doc`, which it sees; None when it may. A status
    the transition does not leave at all is the domain's refusal, not this one."""
    permission = PERMISSIONS.get((mutation, viewer.role))
    if permission is None:
        return f"{mutation} is not for a {viewer.role.value}"
    if not _holds(viewer, permission.relation, doc):
        return f"only {permission.relation.name} may {mutation} it"
    status = Status(doc["status"])
    step = TRANSITIONS.get(mutation)
    if (
        permission.statuses is not None
        and status not in permission.statuses
        and (step is None or status in step.sources)
    ):
        others = [
            p.relation.name
            for (m, _), p in PERMISSIONS.items()
            if m == mutation and p.statuses is not None and status in p.statuses
        ]
        return f"this prescription is {status.value}: only {' or '.join(others)} may {mutation} it"
    return None


def check_may_act(viewer: Viewer, doc: Mapping[str, Any], mutation: str) -> None:
    """Raises Refused("Forbidden") when `may_act` says no."""
    reason = may_act(viewer, doc, mutation)
    if reason is not None:
        raise Refused("Forbidden", reason)


# --- routing tags ------------------------------------------------------------------------

# Every field a relation reads travels with each sequenced event as a tag (named by its first
# path part), so that a follower of the log can apply the same relations.
ROUTED_FIELDS = tuple(
    sorted(
        {
            m.field
            for policy in ROLES.values()
            for alternative in policy.sees.alternatives
            for m in alternative
        }
    )
)


def _tag_name(field: str) -> str:
    return field.split(".")[0]


def _hashed(field: str) -> bool:
    """Personal fields (the patient's id) travel only as a keyed hash."""
    return _tag_name(field) in PERSONAL_FIELDS


class Tags:
    """The routing tags each event carries to followers of the log (subscriptions): the fields
    the relations read, as the document stands after the event, and its new status. The patient
    is a keyed hash (HMAC-SHA256 under `secret`, derived from the log's key: DerivedKeys.tags),
    so entries hold no patient identifier, yet a patient's own events and a filter by patient
    can still be matched."""

    def __init__(self, secret: bytes) -> None:
        self._key = secret

    def patient(self, patient_id: str) -> str:
        return hmac.new(self._key, patient_id.encode(), hashlib.sha256).hexdigest()[:32]

    def _value(self, field: str, value: Any) -> str | None:
        if value is None:
            return None
        return self.patient(str(value)) if _hashed(field) else str(value)

    def of(self, doc: Mapping[str, Any]) -> dict[str, str | None]:
        tags: dict[str, str | None] = {"status": doc["status"]}
        for field in ROUTED_FIELDS:
            tags[_tag_name(field)] = self._value(field, _field(doc, field))
        return tags

    def can_see(self, viewer: Viewer, tags: Mapping[str, str | None]) -> bool:
        """can_see, for an event known only by its tags."""
        return any(
            all(tags.get(_tag_name(f)) == self._value(f, v) for f, v in wanted.items())
            for wanted in _required(viewer, ROLES[viewer.role].sees)
        )


# --- webhook endpoints -------------------------------------------------------------------

# Who manages webhook endpoints, and whose: a PARTNER those of the organization its token's
# `org` claim names, an ADMIN any organization's (None: no claim binds it). Every endpoint
# belongs to one organization and receives exactly what a PARTNER of that organization
# subscribed to the feed would (`webhook_viewer`), by the same relations as above.
WEBHOOK_MANAGERS: dict[Role, Claim | None] = {Role.PARTNER: Claim.ORG, Role.ADMIN: None}


def webhook_organization(viewer: Viewer, requested: str | None) -> str:
    """The organization whose endpoint `viewer` creates (`requested`, or its own). Raises
    NotAllowed for a role that manages no endpoints, a PARTNER without an `org` claim or asking
    for another organization, and an ADMIN that names none."""
    if viewer.role not in WEBHOOK_MANAGERS:
        names = ", ".join(sorted(r.value for r in WEBHOOK_MANAGERS))
        raise NotAllowed(f"webhook endpoints are managed by {names}; you are {viewer.role.value}")
    claim = WEBHOOK_MANAGERS[viewer.role]
    if claim is None:
        if not requested:
            raise NotAllowed("an ADMIN names the organization the endpoint belongs to")
        return requested
    own = _claim(viewer, claim)
    if not own:
        raise NotAllowed(
            f"a {viewer.role.value} token needs an {claim.value!r} claim to manage webhook endpoints"
        )
    if requested is not None and requested != own:
        raise NotAllowed(
            f"a {viewer.role.value} manages the endpoints of its own organization ({own}) only"
        )
    return own


def may_manage_webhooks_of(viewer: Viewer, organization: str) -> bool:
    """Whether `viewer` may see and change the endpoints of `organization`."""
    if viewer.role not in WEBHOOK_MANAGERS:
        return False
    claim = WEBHOOK_MANAGERS[viewer.role]
    return claim is None or _claim(viewer, claim) == organization


def webhook_scope(viewer: Viewer) -> str | None:
    """The one organization whose endpoints `viewer` lists (None: every organization's).
    Raises NotAllowed like `webhook_organization`."""
    if viewer.role not in WEBHOOK_MANAGERS:
        return webhook_organization(viewer, None)  # raises: this role manages none
    claim = WEBHOOK_MANAGERS[viewer.role]
    return None if claim is None else webhook_organization(viewer, None)


def webhook_viewer(endpoint_id: str, organization: str) -> Viewer:
    """Whom an endpoint's deliveries are routed as: a PARTNER of its organization."""
    return Viewer(subject=f"webhook:{endpoint_id}", role=Role.PARTNER, organization=organization)
