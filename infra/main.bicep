// byok-managed-hsm: everything the connected side needs in one resource group.
//
// Deploy:   az deployment group create -g <rg> -f infra/main.bicep -p @infra/main.parameters.json
// Then publish the code, create the audit signing key (byok audit init), assign the HSM data-plane
// roles (infra/assign-hsm-roles.sh) and deploy again with deployEventSubscription=true and
// auditSigningKid (see infra/README.md for why it takes two passes).
targetScope = 'resourceGroup'

@description('Short name used to build resource names (lowercase letters and digits).')
@minLength(3)
@maxLength(12)
param appName string = 'byok'

@description('Azure region for every resource except the existing Managed HSM. Must offer Flex Consumption.')
param location string = resourceGroup().location

@description('Name of the existing Managed HSM that receives the imported keys.')
param managedHsmName string

@description('Resource group of the existing Managed HSM (defaults to this deployment\'s group).')
param managedHsmResourceGroupName string = resourceGroup().name

@description('Optional: the KEK kid (with version) that packages must be wrapped for, as shown by GET /api/kek.')
param kekKid string = ''

@description('Optional: comma-separated KEK names the pipeline accepts (empty = any KEK in the HSM).')
param allowedKekNames string = ''

@description('Optional: comma-separated target types the pipeline accepts, e.g. rsa-3072,rsa-4096,ec-p384,oct-256 (empty = all).')
param allowedTargetTypes string = ''

@description('Largest .byok package the pipeline reads, in bytes.')
@minValue(1024)
@maxValue(1048576)
param maxPackageBytes int = 65536

@description('How many times the pipeline retries a package before it gives up.')
@minValue(1)
@maxValue(20)
param maxAttempts int = 5

@description('Days that audit records stay immutable (container-level time-based retention).')
@minValue(1)
@maxValue(146000)
param auditRetentionDays int = 365

@description('Set to true once the retention policy of the audit container (byok-audit) is locked (infra/README.md, step 6). ARM cannot update a locked policy, so the template then leaves it alone; it stays in force.')
param auditPolicyLocked bool = false

@description('Set to true once the retention policy of the people\'s audit container (byok-audit-people) is locked (infra/README.md, step 6). Separate from auditPolicyLocked so that a deployment locked before this container existed still gets its policy.')
param auditPeoplePolicyLocked bool = false

@description('Versioned kid of the pipeline\'s audit signing key in the Managed HSM (BYOK_AUDIT_SIGNING_KID), as printed by `byok audit init`. Leave empty on the first pass; set it after `byok audit init` and `assign-hsm-roles.sh --audit-key` (infra/README.md, step 5). While it is empty the Function processes no package: every audit record must be signed.')
param auditSigningKid string = ''

@description('Days that deleted blobs, deleted containers and old versions are kept.')
@minValue(7)
@maxValue(365)
param softDeleteRetentionDays int = 30

@description('Days that the Log Analytics workspace keeps logs.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 90

@description('Storage redundancy. Geo-redundant only: the audit trail must survive the loss of a region.')
@allowed([
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param storageSkuName string = 'Standard_GRS'

@description('Import PUTs per second the pipeline aims at (BYOK_HSM_IMPORTS_PER_SECOND). Managed HSM admits about 1 key creation per second per partition (scaling guidance; plan for 2 of its 3 partitions): 2. Each instance paces its imports at this rate, takes 5% off it on every 429 and adds a tenth back per import; the blob trigger\'s concurrency per instance (maxDegreeOfParallelism) is set to twice it.')
@minValue(1)
@maxValue(100)
param hsmImportsPerSecond int = 2

@description('Flex Consumption: most instances the app scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Flex Consumption: memory per instance.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Create the Event Grid subscription. Leave false on the first pass: the subscription needs the published code (its blobs_extension key and validation handshake).')
param deployEventSubscription bool = false

@description('Optional: Entra object ids (users or groups) allowed to upload packages. They get write access to the incoming container only.')
param uploaderPrincipalIds array = []

@description('Optional: Entra object ids (users or groups) that may read status documents. They get read access to the status container only.')
param statusReaderPrincipalIds array = []

@description('Optional: Entra object ids (users or groups) of KEK custodians. They may upload to the incoming and approvals containers, append their signed audit chains to the people\'s audit container (not the Function\'s), read status documents and send audit telemetry.')
param custodianPrincipalIds array = []

@description('Optional: Entra object ids (users or groups) of auditors. They get read access to the two audit containers and the status container only.')
param auditorPrincipalIds array = []

@description('Optional: Entra object ids (users or groups) of import policy administrators. They, and nobody else, may write the import policy in the config container (byok policy set FILE), and they append their signed audit chains to the people\'s audit container.')
param policyAdminPrincipalIds array = []

@description('Optional: e-mail address that receives alerts for failed imports and failed verifications.')
param alertEmailAddress string = ''

@description('Tags applied to every resource.')
param tags object = {
  application: 'byok-managed-hsm'
}

// Container names the pipeline reads from its settings. One source of truth: these values.
var containerNames = {
  incoming: 'byok-incoming'
  status: 'byok-status'
  archive: 'byok-archive'
  quarantine: 'byok-quarantine'
  audit: 'byok-audit'
  auditPeople: 'byok-audit-people'
  config: 'byok-config'
  approvals: 'byok-approvals'
  deadletter: 'byok-deadletter'
  deployment: 'app-package'
}

// The import policy's blob in the config container (BYOK_POLICY_BLOB; `byok policy set` writes it).
var policyBlobName = 'import-policy.json'

// The blob-trigger functions that handle BlobCreated events (function_app.py): packages dropped
// into the incoming container, and manifests and approvals stored in the approvals container.
var functionName = 'process_package'
var approvalFunctionName = 'process_approval'

var suffix = uniqueString(resourceGroup().id, appName)
var storageAccountName = take(toLower('st${replace(appName, '-', '')}${suffix}'), 24)
var functionAppName = 'func-${appName}-${suffix}'

module monitoring 'modules/monitoring.bicep' = {
  name: 'byok-monitoring'
  params: {
    location: location
    tags: tags
    workspaceName: 'log-${appName}-${suffix}'
    appInsightsName: 'appi-${appName}-${suffix}'
    logRetentionDays: logRetentionDays
  }
}

module storage 'modules/storage.bicep' = {
  name: 'byok-storage'
  params: {
    location: location
    tags: tags
    storageAccountName: storageAccountName
    skuName: storageSkuName
    incomingContainerName: containerNames.incoming
    statusContainerName: containerNames.status
    archiveContainerName: containerNames.archive
    quarantineContainerName: containerNames.quarantine
    auditContainerName: containerNames.audit
    auditPeopleContainerName: containerNames.auditPeople
    configContainerName: containerNames.config
    approvalsContainerName: containerNames.approvals
    deadletterContainerName: containerNames.deadletter
    deploymentContainerName: containerNames.deployment
    auditRetentionDays: auditRetentionDays
    auditPolicyLocked: auditPolicyLocked
    auditPeoplePolicyLocked: auditPeoplePolicyLocked
    softDeleteRetentionDays: softDeleteRetentionDays
    workspaceId: monitoring.outputs.workspaceId
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'byok-functionapp'
  params: {
    location: location
    tags: tags
    functionAppName: functionAppName
    planName: 'plan-${appName}-${suffix}'
    identityName: 'id-${appName}-${suffix}'
    deploymentIdentityName: 'id-${appName}-deploy-${suffix}'
    storageAccountName: storage.outputs.storageAccountName
    deploymentContainerName: containerNames.deployment
    appInsightsName: monitoring.outputs.appInsightsName
    workspaceId: monitoring.outputs.workspaceId
    managedHsmUrl: hsmDiagnostics.outputs.hsmUrl
    kekKid: kekKid
    incomingContainerName: containerNames.incoming
    statusContainerName: containerNames.status
    archiveContainerName: containerNames.archive
    quarantineContainerName: containerNames.quarantine
    auditContainerName: containerNames.audit
    auditSigningKid: auditSigningKid
    configContainerName: containerNames.config
    approvalsContainerName: containerNames.approvals
    policyBlobName: policyBlobName
    maxPackageBytes: maxPackageBytes
    maxAttempts: maxAttempts
    allowedKekNames: allowedKekNames
    allowedTargetTypes: allowedTargetTypes
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    hsmImportsPerSecond: hsmImportsPerSecond
  }
}

module roles 'modules/roles.bicep' = {
  name: 'byok-roles'
  params: {
    storageAccountName: storage.outputs.storageAccountName
    appInsightsName: monitoring.outputs.appInsightsName
    functionPrincipalId: functionApp.outputs.identityPrincipalId
    deploymentPrincipalId: functionApp.outputs.deploymentIdentityPrincipalId
    incomingContainerName: containerNames.incoming
    statusContainerName: containerNames.status
    archiveContainerName: containerNames.archive
    quarantineContainerName: containerNames.quarantine
    auditContainerName: containerNames.audit
    auditPeopleContainerName: containerNames.auditPeople
    configContainerName: containerNames.config
    approvalsContainerName: containerNames.approvals
    deploymentContainerName: containerNames.deployment
    uploaderPrincipalIds: uploaderPrincipalIds
    statusReaderPrincipalIds: statusReaderPrincipalIds
    custodianPrincipalIds: custodianPrincipalIds
    auditorPrincipalIds: auditorPrincipalIds
    policyAdminPrincipalIds: policyAdminPrincipalIds
  }
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'byok-eventgrid'
  params: {
    location: location
    tags: tags
    systemTopicName: 'evgt-${appName}-${suffix}'
    storageAccountName: storage.outputs.storageAccountName
    deadletterContainerName: containerNames.deadletter
  }
  dependsOn: [
    roles
  ]
}

// Second pass only: the subscription reads the blobs_extension key with listKeys(), which exists
// once the code is published. As a conditional module, pass 1 never evaluates that call.
module eventSubscription 'modules/eventsubscription.bicep' = if (deployEventSubscription) {
  name: 'byok-eventsubscription'
  params: {
    systemTopicName: eventGrid.outputs.systemTopicName
    storageAccountName: storage.outputs.storageAccountName
    functionAppName: functionApp.outputs.functionAppName
    functionName: functionName
    approvalFunctionName: approvalFunctionName
    incomingContainerName: containerNames.incoming
    approvalsContainerName: containerNames.approvals
    deadletterContainerName: containerNames.deadletter
  }
}

module hsmDiagnostics 'modules/hsm-diagnostics.bicep' = {
  name: 'byok-hsm-diagnostics'
  scope: resourceGroup(managedHsmResourceGroupName)
  params: {
    managedHsmName: managedHsmName
    workspaceId: monitoring.outputs.workspaceId
  }
}

module dashboards 'modules/dashboards.bicep' = {
  name: 'byok-dashboards'
  params: {
    location: location
    tags: tags
    appName: appName
    workspaceId: monitoring.outputs.workspaceId
    alertEmailAddress: alertEmailAddress
  }
}

@description('Function app name, for `func azure functionapp publish`.')
output functionAppName string = functionApp.outputs.functionAppName

@description('Host name of the function app.')
output functionAppHostName string = functionApp.outputs.defaultHostName

@description('Object (principal) id of the function\'s user-assigned identity: pass it to assign-hsm-roles.sh.')
output functionPrincipalId string = functionApp.outputs.identityPrincipalId

@description('Client id of the function\'s user-assigned identity.')
output functionClientId string = functionApp.outputs.identityClientId

@description('Storage account that holds the incoming, status, archive, quarantine, audit, people audit, config, approvals and dead-letter containers.')
output storageAccountName string = storage.outputs.storageAccountName

@description('Container to upload .byok packages to.')
output incomingContainerName string = containerNames.incoming

@description('Container of the import policy (written by policyAdminPrincipalIds only, with byok policy set).')
output configContainerName string = containerNames.config

@description('Container that uploaders and custodians write signed approvals to.')
output approvalsContainerName string = containerNames.approvals

@description('Container of the Function\'s signed audit chains (BYOK_AUDIT_CONTAINER); auditors read it.')
output auditContainerName string = containerNames.audit

@description('Container of the people\'s signed audit chains (BYOK_AUDIT_PEOPLE_CONTAINER for the CLI): custodians and policy administrators append, auditors read.')
output auditPeopleContainerName string = containerNames.auditPeople

@description('Log Analytics workspace that receives the audit events, HSM AuditEvent logs and storage logs.')
output workspaceId string = monitoring.outputs.workspaceId

@description('Resource id of the BYOK workbook.')
output workbookId string = dashboards.outputs.workbookId
